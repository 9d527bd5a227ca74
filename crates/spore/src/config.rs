//! `spore serve --config FILE` (and `spore shim`): a TOML file of the daemon's options.
//!
//! Each key is an option's long name (`max_instances` or `max-instances`); a value is a
//! string, a number, a boolean (a flag that is set when true) or a list (the option
//! repeated). The file's options go in front of the command line's, where the command line
//! and the environment do not set them already, so flags win over environment variables,
//! which win over the file, which wins over the defaults. A key that names no option is an
//! error, never ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

/// Where the daemon looks for its configuration when `--config` is not given.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/spore/spore.toml";

/// `argv` with the options of the configuration file (if any) of a `serve` or `shim`
/// command added.
pub(crate) fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(pos) = argv
        .iter()
        .position(|a| a == "serve" || a == "shim")
        .filter(|&p| p == 1)
    else {
        return Ok(argv);
    };
    let sub = argv[pos].to_string_lossy().into_owned();
    let given = |flag: &str| {
        argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        })
    };
    let explicit = argv
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| argv.get(i + 1))
        .map(PathBuf::from)
        .or_else(|| {
            argv.iter().find_map(|a| {
                a.to_string_lossy()
                    .strip_prefix("--config=")
                    .map(PathBuf::from)
            })
        })
        .or_else(|| std::env::var_os("SPORE_CONFIG").map(PathBuf::from));
    let path = match explicit {
        Some(p) => p,
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(argv),
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let cmd = crate::cli::Cli::command();
    let sub_cmd = cmd
        .find_subcommand(&sub)
        .expect("serve and shim are subcommands");
    let known: Vec<(String, Option<String>, bool)> = sub_cmd
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            let is_flag = matches!(
                a.get_action(),
                clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
            );
            Some((long, env, is_flag))
        })
        .filter(|(l, _, _)| l != "config" && l != "help")
        .collect();
    let mut added: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some((_, env, is_flag)) = known.iter().find(|(l, _, _)| *l == long) else {
            bail!(
                "{}: {key:?} is not an option of `spore {sub}` (see `spore {sub} --help`)",
                path.display()
            );
        };
        let flag = format!("--{long}");
        let from_env = env.as_ref().is_some_and(|e| std::env::var_os(e).is_some());
        if given(&flag) || from_env {
            continue;
        }
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "{}: {key:?} must be a string or a number, not {}",
                    path.display(),
                    other.type_str()
                ),
            })
        };
        match value {
            toml::Value::Boolean(b) if *is_flag => {
                if *b {
                    added.push(flag.into());
                }
            }
            toml::Value::Array(items) => {
                for v in items {
                    added.push(format!("{flag}={}", scalar(v)?).into());
                }
            }
            v => added.push(format!("{flag}={}", scalar(v)?).into()),
        }
    }
    let mut out = argv[..=pos].to_vec();
    out.extend(added);
    out.extend_from_slice(&argv[pos + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_file_fills_what_the_command_line_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("spore.toml");
        std::fs::write(
            &f,
            "max_instances = 16\nkeep-alive-s = 60\nlisten = \"127.0.0.1:9100\"\n",
        )
        .unwrap();
        let out = expand(argv(&[
            "spore",
            "serve",
            "--config",
            f.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9200",
        ]))
        .unwrap();
        let out: Vec<String> = out
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(out.contains(&"--max-instances=16".to_owned()), "{out:?}");
        assert!(out.contains(&"--keep-alive-s=60".to_owned()), "{out:?}");
        assert!(
            !out.iter().any(|a| a.contains("9100")),
            "the flag wins: {out:?}"
        );
        std::fs::write(&f, "max_instance = 3\n").unwrap();
        let e = expand(argv(&["spore", "serve", "--config", f.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"max_instance\" is not an option"), "{e}");
    }
}
