//! The dashboard's own CSS and JavaScript, compiled into the binary (`include_bytes!`) and
//! served at a path carrying a hash of their contents, so that browsers may cache them for a
//! year (`immutable`) and a new build is fetched at once.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};

use super::Page;

const CSS: &[u8] = include_bytes!("../../static/app.css");
const JS: &[u8] = include_bytes!("../../static/app.js");

/// The first 12 hex digits of the SHA-256 of both files.
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let mut h = Sha256::new();
        h.update(CSS);
        h.update(JS);
        hex::encode(h.finalize())[..12].to_string()
    })
}

pub fn css_path() -> String {
    format!("/ui/static/{}/app.css", version())
}

pub fn js_path() -> String {
    format!("/ui/static/{}/app.js", version())
}

pub fn serve(version_seg: &str, file: &str) -> Page {
    let found = match file {
        "app.css" => Some((CSS, "text/css; charset=utf-8")),
        "app.js" => Some((JS, "text/javascript; charset=utf-8")),
        _ => None,
    };
    match found {
        Some((bytes, kind)) if version_seg == version() => {
            let r = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, kind)
                .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
                .body(Full::new(Bytes::from_static(bytes)))
                .expect("static response parts are valid");
            super::secured(r, false)
        }
        _ => super::error_page(StatusCode::NOT_FOUND, "No such file."),
    }
}
