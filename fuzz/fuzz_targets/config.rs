//! Config loading from arbitrary YAML: `config::from_file_text`, the function
//! `keygate check-config` and `serve` run on the file's text, with a fake
//! file name. It must answer Ok or an error, never panic; an error is one line
//! that starts with the file name (`fuzz.yaml:LINE:COL: ` or `fuzz.yaml: `),
//! or with the `KEYGATE_*` variable it came from. A config that loads must
//! compile into a route table.
//!
//! Input: YAML text, optionally followed by a line `#env` and
//! `KEYGATE_NAME=value` lines (the environment overrides, which
//! `from_file_text` reads from the process; here they are passed to
//! `config::parse`, which it calls, so that the process environment plays no
//! part).

#![no_main]

use std::path::Path;

use keygate::config::{self, ConfigError};
use keygate::keys::{Token, check_format};
use keygate::proxy::route::RouteTable;
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.yaml";

fn check_error(e: &ConfigError, env: &[(String, String)]) {
    let shown = e.to_string();
    assert!(!shown.contains('\n'), "not one line: {shown:?}");
    if e.location.is_empty() {
        let var = shown.split(':').next().unwrap_or("");
        assert!(
            env.iter().any(|(k, _)| k == var),
            "an error without a location must name its variable: {shown:?}"
        );
        return;
    }
    let loc = e
        .location
        .strip_prefix(ORIGIN)
        .and_then(|l| l.strip_suffix(": "))
        .unwrap_or_else(|| panic!("location {:?} of {shown:?}", e.location));
    if !loc.is_empty() {
        // `:LINE:COL`, both 1-based.
        let mut parts = loc.strip_prefix(':').expect(":LINE:COL").split(':');
        for what in ["line", "column"] {
            let n: u64 = parts
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no {what} in {shown:?}"));
            assert!(n >= 1, "{what} 0 in {shown:?}");
        }
        assert!(parts.next().is_none(), "{shown:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        // `config::read` refuses a file that is not UTF-8 before parsing.
        return;
    };
    let (yaml, env_text) = text.split_once("\n#env\n").unwrap_or((text, ""));
    let env: Vec<(String, String)> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("KEYGATE_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();

    if env.is_empty() {
        // With no overrides in play, the entry point itself (it also reads
        // the process environment: keep KEYGATE_* unset when fuzzing).
        match config::from_file_text(Path::new(ORIGIN), yaml) {
            Ok(cfg) => assert_eq!(cfg.source.as_deref(), Some(Path::new(ORIGIN))),
            Err(e) => check_error(&e, &env),
        }
    }
    match config::parse(yaml, ORIGIN, &env) {
        Ok(cfg) => {
            let token = Token::generate(&cfg.keys.prefix);
            assert_eq!(check_format(&cfg.keys.prefix, token.expose()), Ok(()));
            assert!(!cfg.keys.headers.is_empty());
            let table = RouteTable::new(&cfg.routes);
            assert_eq!(table.len(), cfg.routes.len());
            for r in &cfg.routes {
                assert!(!r.name.is_empty());
                assert!(r.upstream.authority().is_some(), "{:?}", r.upstream);
            }
        }
        Err(e) => check_error(&e, &env),
    }
});
