//! `rws serve --config FILE`: a TOML file whose keys are the long names of
//! `serve`'s flags (`max_batch = 16` or `max-batch = 16`). Its entries become
//! flags placed before the command line's own, and later flags win, so a flag
//! given on the command line overrides the file and every key means exactly
//! what its flag means (an unknown key is an unknown flag). The one table is
//! `[events]`, the event rules (what `--event-rules FILE` holds).

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The command line with the config file's entries spliced in after `serve`.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let Some(at) = args.iter().position(|a| a == "serve") else {
        return Ok(args);
    };
    let flags = flags(&path)?;
    let mut out = args[..=at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(v.into());
        }
    }
    None
}

fn flags(path: &OsString) -> Result<Vec<OsString>> {
    let path = Path::new(path);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        if flag == "--config" {
            bail!("{}: a config file cannot name another", path.display());
        }
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "{}: `{key}` must be a string, a number, a boolean or a list of those, not {}",
                    path.display(),
                    other.type_str()
                ),
            })
        };
        match &value {
            // The event rules are a table of their own: handed over whole.
            toml::Value::Table(t) if key == "events" => {
                out.push("--event-rules-inline".into());
                out.push(toml::to_string(t)?.into());
            }
            toml::Value::Boolean(true) => out.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.push(flag.clone().into());
                    out.push(scalar(item)?.into());
                }
            }
            v => {
                out.push(flag.into());
                out.push(scalar(v)?.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn file_entries_go_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rws.toml");
        std::fs::write(
            &file,
            "max_batch = 16\naddr = \"0.0.0.0:1\"\nno-auto-profiles = true\nverbose = false\n",
        )
        .unwrap();
        let got = expand(args(&format!(
            "rws serve --config {} --max-batch 4",
            file.display()
        )))
        .unwrap();
        let want = format!(
            "rws serve --addr 0.0.0.0:1 --max-batch 16 --no-auto-profiles --config {} --max-batch 4",
            file.display()
        );
        assert_eq!(got, args(&want));
    }

    #[test]
    fn the_events_table_is_handed_over_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rws.toml");
        let rules = "[events]\nmin_hold = \"5m\"\n[[events.rule]]\nkind = \"fog\"\nseverity = [2, 5]\nprofile = \"fog\"\nttl = \"1h\"\n";
        std::fs::write(&file, rules).unwrap();
        let got = expand(args(&format!("rws serve --config {}", file.display()))).unwrap();
        assert_eq!(got[2], "--event-rules-inline");
        let parsed = rws::serve::events::Rules::parse(got[3].to_str().unwrap()).unwrap();
        assert_eq!(parsed.rules[0].profile, "fog");
        assert_eq!(parsed.min_hold, std::time::Duration::from_secs(300));
    }

    #[test]
    fn nested_tables_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rws.toml");
        std::fs::write(&file, "[server]\naddr = \"x\"\n").unwrap();
        let err = expand(args(&format!("rws serve --config {}", file.display()))).unwrap_err();
        assert!(err.to_string().contains("must be a string"), "{err}");
    }
}
