//! Arbitrary UTF-8 as a config file: `Config::from_toml` answers Ok or a ConfigError, never
//! panics, and its error renders.
#![no_main]

use kyberhook::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match Config::from_toml(text, "fuzz") {
        Ok(config) => {
            // A valid config answers the questions the engine asks of it.
            for attempt in 0..=config.delivery.retry_schedule.len() as u32 + 1 {
                let _ = config.retry_delay(attempt);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
