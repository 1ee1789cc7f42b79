//! No cycle at the edge (issue 21): the JSON API (`src/api/`) and the dashboard (`src/ui/`)
//! are siblings over the domain layer (`src/domain/`) and the HTTP edge (`src/edge/`), so
//!
//! - nothing under `src/api/` names `ui`, nothing under `src/ui/` names `api`;
//! - the domain names neither;
//! - the edge names neither, nor the domain (it is the bottom of the HTTP stack: the engine
//!   hands it the two front ends as handlers);
//! - `metrics` (its own listener) names neither front end.
//!
//! The sources are read as text: comments, strings and char literals are dropped, then every
//! path that starts with `crate` or `super` (including `use` groups, `crate::{a, b}`) is
//! resolved to the top-level module it reaches, counting the inline modules (`mod tests { … }`)
//! a `super` climbs out of. A path the rules forbid fails the test with its file and line.
//! A rough equivalent by hand is in `src/lib.rs`'s module list (a `grep -rnE`).

use std::path::{Path, PathBuf};

/// (top-level module, what it must not name).
const RULES: &[(&str, &[&str])] = &[
    ("api", &["ui"]),
    ("ui", &["api"]),
    ("domain", &["api", "ui"]),
    ("edge", &["api", "ui", "domain"]),
    ("metrics", &["api", "ui"]),
];

#[test]
fn the_front_ends_the_domain_and_the_edge_do_not_name_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    for (top, _) in RULES {
        let files = module_files(&src, top);
        // A renamed or moved module would otherwise pass by checking nothing.
        assert!(!files.is_empty(), "no source files for module `{top}`");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let module = module_path(&src, &file);
            let shown = file.strip_prefix(src.parent().unwrap()).unwrap().display();
            for o in offences_in(&module, &text) {
                offences.push(format!("{shown}:{o}"));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "modules name a layer they must not (issue 21, see tests/it/layers.rs):\n  {}",
        offences.join("\n  ")
    );
}

/// The checker finds what it is for, so that the test above can fail.
#[test]
fn the_checker_finds_each_way_of_naming_a_forbidden_module() {
    let ui_screens = ["ui".to_string(), "screens".to_string()];
    let found = |module: &[String], text: &str| offences_in(module, text);

    assert_eq!(found(&ui_screens, "use crate::api::Caller;\n").len(), 1);
    assert_eq!(
        found(&ui_screens, "use super::super::api::Call;\n").len(),
        1
    );
    assert_eq!(
        found(&ui_screens, "fn f() { let _ = crate :: api :: ROUTES; }\n").len(),
        1
    );
    // A group names each of its members.
    let api = ["api".to_string()];
    let group = found(&api, "use crate::{domain::Refusal, ui::{self, Page}};\n");
    assert_eq!(group.len(), 1, "{group:?}");
    assert!(group[0].starts_with("1: crate::ui"), "{group:?}");
    // `super` out of an inline module climbs one level less.
    let ui = ["ui".to_string()];
    let inline = "mod tests {\n    use super::super::api::Call;\n}\n";
    let hits = found(&ui, inline);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].starts_with("2: super::super::api"), "{hits:?}");
    assert!(found(&ui, "mod tests {\n    use super::api_page;\n}\n").is_empty());
    // Inside its own tree a module may name itself; the edge may not name the domain.
    assert!(found(&ui_screens, "use super::{refusal_page, Page};\n").is_empty());
    assert!(found(&ui_screens, "use crate::ui::session::Session;\n").is_empty());
    assert_eq!(
        found(&["edge".to_string()], "use crate::domain::Refusal;\n").len(),
        1
    );
    // Comments, strings and char literals are not code; a lifetime is not a char.
    let quiet = "// use crate::api::Caller;\n/* crate::api /* nested */ crate::ui */\n\
                 /// [`crate::api`]\nconst S: &str = \"crate::api::X\";\n\
                 const R: &str = r#\"crate::ui\"#;\nconst C: char = '\"';\n\
                 fn f<'a>(x: &'a str) -> &'a str { x }\n";
    assert!(
        found(&ui_screens, quiet).is_empty(),
        "{:?}",
        found(&ui_screens, quiet)
    );
    assert_eq!(
        found(&ui_screens, &format!("{quiet}use crate::api;\n")).len(),
        1
    );
    // `pub(crate)` and `pub(super)` are visibilities, not paths.
    assert!(found(&ui_screens, "pub(crate) fn f() {}\npub(super) fn g() {}\n").is_empty());
}

/// Every `.rs` file of a top-level module: `src/{top}.rs` and everything under `src/{top}/`.
fn module_files(src: &Path, top: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let single = src.join(format!("{top}.rs"));
    if single.is_file() {
        files.push(single);
    }
    let mut dirs = vec![src.join(top)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// `src/ui/screens.rs` → `["ui", "screens"]`; `src/edge/mod.rs` → `["edge"]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut module: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    module
}

/// The forbidden paths in one file of `module`, as `"{line}: {path} — …"`.
fn offences_in(module: &[String], text: &str) -> Vec<String> {
    let forbidden: &[&str] = RULES
        .iter()
        .find(|(top, _)| *top == module[0])
        .map_or(&[], |(_, f)| f);
    let mut out = Vec::new();
    for reference in references(module, &tokens(text)) {
        if forbidden.contains(&reference.top.as_str()) {
            out.push(format!(
                "{}: {} — `{}` must not name `{}`",
                reference.line, reference.path, module[0], reference.top
            ));
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
}

/// Rust source as identifiers and punctuation with their lines, without comments, strings,
/// char literals or lifetimes (only paths matter here).
fn tokens(text: &str) -> Vec<(usize, Tok)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            '/' if at(i + 1) == '/' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(chars[i] == '\n');
                        i += 1;
                    }
                }
            }
            '"' => {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    line += usize::from(at(i) == '\n');
                    i += 1;
                }
                i += 1;
            }
            '\'' => {
                // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a): a lifetime has no
                // closing quote right after its first character.
                if at(i + 1) == '\\' {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    i += 1;
                    while at(i).is_alphanumeric() || at(i) == '_' {
                        i += 1;
                    }
                }
            }
            'r' | 'b' if is_raw_string(&chars, i) => {
                // r"…", r#"…"#, br#"…"#: ends at a quote followed by as many hashes.
                while chars[i] != '#' && chars[i] != '"' {
                    i += 1;
                }
                let mut hashes = 0;
                while chars[i] == '#' {
                    hashes += 1;
                    i += 1;
                }
                i += 1;
                loop {
                    if i >= chars.len() {
                        break;
                    }
                    if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                        i += 1 + hashes;
                        break;
                    }
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                // `b"…"` and `b'…'`: the prefix is not an identifier; the literal follows.
                if !(word == "b" && matches!(at(i), '"' | '\'')) {
                    out.push((line, Tok::Ident(word)));
                }
            }
            ':' if at(i + 1) == ':' => {
                out.push((line, Tok::Sep));
                i += 2;
            }
            c if c.is_whitespace() => i += 1,
            c => {
                out.push((line, Tok::Punct(c)));
                i += 1;
            }
        }
    }
    out
}

fn is_raw_string(chars: &[char], i: usize) -> bool {
    // Not in the middle of an identifier (`for`, `sub"`…).
    if i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_') {
        return false;
    }
    let mut j = i;
    if chars[j] == 'b' {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return false;
    }
    j += 1;
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    chars.get(j) == Some(&'"')
}

/// A path out of the current module and the top-level module it reaches.
struct Reference {
    line: usize,
    path: String,
    top: String,
}

/// Every `crate::…` and `super::…` path in the tokens of a file of `module`, with `use`
/// groups expanded to their members' first segments.
fn references(module: &[String], toks: &[(usize, Tok)]) -> Vec<Reference> {
    let ident = |i: usize| match toks.get(i) {
        Some((_, Tok::Ident(w))) => Some(w.as_str()),
        _ => None,
    };
    let is = |i: usize, t: &Tok| toks.get(i).map(|(_, x)| x) == Some(t);
    let mut out = Vec::new();
    // The inline modules open at this point (`mod name {`), with the brace depth they close at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        let (line, tok) = &toks[i];
        match tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some(name), true) = (ident(i + 1), is(i + 2, &Tok::Punct('{'))) {
                    inline.push((name.to_string(), depth));
                }
            }
            Tok::Ident(w)
                if (w == "crate" || w == "super")
                    && !(i > 0 && is(i - 1, &Tok::Sep))
                    && is(i + 1, &Tok::Sep) =>
            {
                // The path's leading segments: `crate`, or a run of `super`s.
                let mut segs = vec![w.clone()];
                let mut j = i + 1;
                while is(j, &Tok::Sep) && ident(j + 1) == Some("super") && w == "super" {
                    segs.push("super".into());
                    j += 2;
                }
                let mut here: Vec<String> = module.to_vec();
                here.extend(inline.iter().map(|(name, _)| name.clone()));
                let firsts: Vec<String> = if is(j, &Tok::Sep) && is(j + 1, &Tok::Punct('{')) {
                    group_firsts(toks, j + 1)
                } else if is(j, &Tok::Sep) {
                    ident(j + 1).map(str::to_string).into_iter().collect()
                } else {
                    Vec::new()
                };
                for first in firsts {
                    if let Some(top) = resolve(&here, &segs, &first) {
                        out.push(Reference {
                            line: *line,
                            path: format!("{}::{first}", segs.join("::")),
                            top,
                        });
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The first segment of each member of the `use` group opening at `open` (`{a::b, c, d::{e}}`
/// → a, c, d).
fn group_firsts(toks: &[(usize, Tok)], open: usize) -> Vec<String> {
    let mut firsts = Vec::new();
    let mut depth = 0;
    let mut expect_first = true;
    for (_, tok) in &toks[open..] {
        match tok {
            Tok::Punct('{') => {
                depth += 1;
                expect_first = depth == 1;
            }
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Punct(',') if depth == 1 => expect_first = true,
            Tok::Ident(w) if expect_first && depth == 1 => {
                firsts.push(w.clone());
                expect_first = false;
            }
            _ => expect_first = false,
        }
    }
    firsts
}

/// The top-level module `segs::first` reaches from module `here`; `None` when it stays where
/// it is (`self`) or climbs out of the crate.
fn resolve(here: &[String], segs: &[String], first: &str) -> Option<String> {
    if segs[0] == "crate" {
        return (first != "self").then(|| first.to_string());
    }
    let base = here.len().checked_sub(segs.len())?;
    if base > 0 {
        Some(here[0].clone())
    } else {
        (first != "self").then(|| first.to_string())
    }
}
