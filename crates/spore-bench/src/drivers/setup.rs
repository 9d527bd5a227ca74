//! What the drivers set up before measuring: the daemon they talk to, and the sample
//! functions deployed to it under the names and settings each benchmark wants.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use spore_client::{read_manifest, Client, ManagedDaemon};
use spore_core::{FunctionManifest, SandboxKind};

/// The daemon a driver talks to: the one at the endpoint, or one it started.
pub(crate) struct Daemon {
    /// A client of it.
    pub client: Client,
    /// Its endpoint.
    pub endpoint: String,
    /// The daemon started for this run (stopped on drop), if none answered at the endpoint.
    pub started: Option<ManagedDaemon>,
}

impl Daemon {
    /// The daemon at `endpoint` when one is given (it must answer), else one started for
    /// this run on a fresh data dir under `.spore/<what>` (removed when it stops; its log stays), so that a
    /// demo or benchmark never changes the functions of a daemon it did not start.
    pub fn for_run(endpoint: Option<&str>, what: &str) -> Result<Daemon> {
        if let Some(endpoint) = endpoint {
            let client = Client::new(endpoint)?;
            anyhow::ensure!(
                client.healthy(),
                "no daemon answers at {endpoint} (--use-running-daemon needs one)"
            );
            eprintln!(
                "using the daemon at {endpoint}: its functions named like the samples are replaced"
            );
            crate::cold_start::use_credentials(client.http().credentials().cloned());
            return Ok(Daemon {
                client,
                endpoint: endpoint.to_owned(),
                started: None,
            });
        }
        let dir = PathBuf::from(".spore").join(what);
        eprintln!(
            "starting a daemon for this run (log: {}/daemon.log; --use-running-daemon uses the one at --endpoint)",
            dir.display()
        );
        let packages = std::env::var_os("SPORE_PACKAGES_DIR").map(PathBuf::from);
        // It takes unit links on loopback, for the demo's processing-units part.
        let d = ManagedDaemon::start(
            &dir,
            packages,
            &["--link-listen".into(), "127.0.0.1:0".into()],
        )?;
        let creds = d.credentials()?;
        crate::cold_start::use_credentials(creds.clone());
        Ok(Daemon {
            client: Client::with_credentials(&d.endpoint, creds)?,
            endpoint: d.endpoint.clone(),
            started: Some(d),
        })
    }
}

/// The function folders (those with a `spore.toml`) directly under `root`, sorted.
pub(crate) fn function_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("reading the functions folder {} (run from the repository root, or pass --functions)", root.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("spore.toml").is_file())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Deploys the function in `dir` as `name` with `sandbox`, after `adjust` has changed the rest
/// of its manifest; returns the manifest deployed.
pub(crate) fn deploy_variant(
    client: &Client,
    dir: &Path,
    name: &str,
    sandbox: SandboxKind,
    adjust: impl FnOnce(&mut FunctionManifest),
) -> Result<FunctionManifest> {
    let mut m = read_manifest(dir)?;
    m.name = name.to_owned();
    m.sandbox = sandbox;
    adjust(&mut m);
    client.deploy_dir(dir, &m)?;
    Ok(m)
}

/// Deploys the function in `dir` as `name`, pinned to `unit`.
pub(crate) fn deploy_on(
    client: &Client,
    dir: &Path,
    name: &str,
    sandbox: SandboxKind,
    unit: u32,
) -> Result<()> {
    deploy_variant(client, dir, name, sandbox, |m| m.unit = Some(unit))?;
    Ok(())
}

/// Deploys every sample function twice: as a container function and as `<name>-cfork`.
pub(crate) fn deploy_samples(
    client: &Client,
    functions: &Path,
) -> Result<Vec<crate::functionbench::Workload>> {
    let mut out = Vec::new();
    for dir in function_dirs(functions)? {
        let m = read_manifest(&dir)?;
        deploy_variant(client, &dir, &m.name, SandboxKind::Container, |_| {})?;
        let cfork = format!("{}-cfork", m.name);
        deploy_variant(client, &dir, &cfork, SandboxKind::Cfork, |_| {})?;
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        out.push(crate::functionbench::Workload {
            container: m.name,
            cfork,
            payload,
        });
    }
    Ok(out)
}

/// Deploys `<name>-snap` (a container function with `snapshot = true`) and, with `twins`,
/// `<name>-tsnap` (its cfork twin, whose template is snapshotted) for each name.
pub(crate) fn deploy_snapshotted(
    client: &Client,
    functions: &Path,
    names: &[&str],
    twins: bool,
) -> Result<Vec<crate::snapshot::Workload>> {
    let mut out = Vec::new();
    for name in names {
        let dir = functions.join(name);
        let snapshotted = |m: &mut FunctionManifest| {
            m.snapshot = true;
            // Primed like SnapStart: the handler's first-call loads are then in the image.
            if m.warmup_event.is_none() && dir.join("event.json").is_file() {
                m.warmup_event = Some("event.json".into());
            }
        };
        let m = deploy_variant(
            client,
            &dir,
            &format!("{name}-snap"),
            SandboxKind::Container,
            snapshotted,
        )?;
        let payload = std::fs::read(dir.join("event.json")).unwrap_or_else(|_| b"{}".to_vec());
        let mut cfork = None;
        if twins {
            let t = deploy_variant(
                client,
                &dir,
                &format!("{name}-tsnap"),
                SandboxKind::Cfork,
                snapshotted,
            )?;
            cfork = Some(t.name);
        }
        out.push(crate::snapshot::Workload {
            function: m.name,
            cfork,
            payload,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_dirs_are_the_folders_with_a_manifest() {
        let root = tempfile::tempdir().unwrap();
        for (dir, manifest) in [("b", true), ("a", true), ("not-a-function", false)] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
            if manifest {
                std::fs::write(root.path().join(dir).join("spore.toml"), "").unwrap();
            }
        }
        std::fs::write(root.path().join("chain.toml"), "").unwrap();
        let dirs = function_dirs(root.path()).unwrap();
        assert_eq!(dirs, vec![root.path().join("a"), root.path().join("b")]);
        let e = function_dirs(&root.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("pass --functions"), "{e}");
    }
}
