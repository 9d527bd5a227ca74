//! The client commands that show what a daemon holds: functions, units, processes, one
//! function in detail, logs, access keys, the dashboard's login URL, shell completions.

use std::process::ExitCode;

use anyhow::{Context, Result};
use spore_client::Client;

use crate::out::{self, Table};

/// `spore units`.
pub fn units(endpoint: &str) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let v = client.units()?;
    if out::json() {
        out::print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let units = v["Units"].as_array().cloned().unwrap_or_default();
    let list = |x: &serde_json::Value| -> Vec<String> {
        x.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut t = Table::new(&[
        "UNIT",
        "STATE",
        "ARCH",
        ">CORES",
        ">MEM_MB",
        "ACCEL",
        ">INFLIGHT",
        ">INSTANCES",
        "PEER",
        "FUNCTIONS",
    ]);
    let mut notes = Vec::new();
    for u in &units {
        let accel = list(&u["accelerators"]);
        let peer = if u["local"].as_bool() == Some(true) {
            "(control plane)".to_owned()
        } else {
            u["peer"].as_str().unwrap_or("").to_owned()
        };
        t.row(vec![
            u["id"].to_string(),
            u["state"].as_str().unwrap_or("?").to_owned(),
            u["arch"].as_str().unwrap_or("?").to_owned(),
            u["cores"].to_string(),
            u["memory_mb"].to_string(),
            if accel.is_empty() {
                "-".to_owned()
            } else {
                accel.join(",")
            },
            u["inflight"].to_string(),
            u["load"]["instances"].to_string(),
            peer,
            list(&u["functions"]).join(","),
        ]);
        let id = &u["id"];
        if let Some(e) = u["etcd"].as_str() {
            notes.push(format!("unit {id}: etcd: {e}"));
        }
        if let Some(addr) = u["link"].as_str() {
            let linked = list(&u["load"]["neighbours"]);
            notes.push(format!(
                "unit {id}: takes neighbour links on {addr}; linked to units: {}",
                if linked.is_empty() {
                    "none yet".to_owned()
                } else {
                    linked.join(",")
                }
            ));
        }
        if u["state"] == "down" {
            notes.push(format!(
                "unit {id}: down for {:.0} s: {}",
                u["since_s"].as_f64().unwrap_or(0.0),
                u["reason"].as_str().unwrap_or("")
            ));
        }
    }
    t.print();
    for n in notes {
        println!("{n}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore ls`.
pub fn ls(endpoint: &str) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    // ListFunctions pages (function names need no escaping in a marker); bounded in count.
    let mut functions = Vec::new();
    let mut marker: Option<String> = None;
    for _ in 0..10_000 {
        let path = match &marker {
            None => "/2015-03-31/functions?MaxItems=10000".to_owned(),
            Some(m) => format!("/2015-03-31/functions?MaxItems=10000&Marker={m}"),
        };
        let page = client.get_json(&path)?;
        functions.extend(page["Functions"].as_array().cloned().unwrap_or_default());
        marker = page["NextMarker"].as_str().map(str::to_owned);
        if marker.is_none() {
            break;
        }
    }
    if out::json() {
        out::print_json(&serde_json::json!({ "Functions": functions }));
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "NAME",
        "RUNTIME",
        "SANDBOX",
        "HANDLER",
        ">MEMORY",
        ">TIMEOUT",
        "LAST MODIFIED",
    ]);
    for f in &functions {
        let s = |k: &str| f[k].as_str().unwrap_or("?").to_owned();
        t.row(vec![
            s("FunctionName"),
            s("Runtime"),
            s("SporeSandbox"),
            s("Handler"),
            format!("{} MB", f["MemorySize"]),
            format!("{} s", f["Timeout"]),
            s("LastModified"),
        ]);
    }
    t.print();
    if functions.is_empty() {
        println!("(no functions deployed; try `spore deploy functions/hello`)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore rm NAME`.
pub fn rm(endpoint: &str, name: &str, force: bool) -> Result<ExitCode> {
    let broken = Client::new(endpoint)?.delete_with(name, force)?;
    println!("deleted {name}");
    if !broken.is_empty() {
        eprintln!(
            "warning: DAGs that use {name} are now broken (their invocations fail until {name} is deployed again): {}",
            crate::out::printable(&broken.join(", "))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore logs NAME`.
pub fn logs(
    endpoint: &str,
    name: &str,
    lines: usize,
    follow: bool,
    since: Option<&str>,
    request_id: Option<&str>,
) -> Result<ExitCode> {
    let since_ms = since
        .map(|s| {
            let d = crate::cli::parse_duration(s).map_err(|e| anyhow::anyhow!("--since {e}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            Ok::<u64, anyhow::Error>(now.saturating_sub(d.as_millis() as u64))
        })
        .transpose()?;
    let client = Client::new(endpoint)?;
    for e in client.log_events(name, lines, since_ms, request_id)? {
        print_log_event(&e);
    }
    if follow {
        client.follow_logs(name, |e| {
            if request_id.is_none_or(|r| e["requestId"].as_str() == Some(r)) {
                print_log_event(e);
            }
            true
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One log line: its time (UTC), request id (`-` outside invocations) and text.
fn print_log_event(e: &serde_json::Value) {
    if out::json() {
        println!("{e}");
        return;
    }
    let t = e["timestamp"].as_u64().unwrap_or(0);
    let ts = spore_registry::store::lambda_timestamp(t);
    let rid = e["requestId"].as_str().unwrap_or("-");
    println!(
        "{ts}  {}  {}",
        out::printable(&format!("{rid:<36}")),
        out::printable(e["message"].as_str().unwrap_or_default())
    );
}

/// `spore keys`.
pub fn keys(endpoint: &str, which: crate::cli::KeysCommand) -> Result<ExitCode> {
    use crate::cli::KeysCommand;
    let client = Client::new(endpoint)?;
    match which {
        KeysCommand::Create {
            name,
            invoke_only,
            functions,
        } => {
            let k = client.create_key(&name, invoke_only, functions.as_deref())?;
            let s = |f: &str| k[f].as_str().unwrap_or_default().to_owned();
            println!("[{}]", s("Name"));
            println!("aws_access_key_id = {}", s("AccessKeyId"));
            println!("aws_secret_access_key = {}", s("SecretAccessKey"));
            eprintln!(
                "the secret is shown once: keep these lines in a credentials file (mode 0600) and use --profile {}",
                s("Name")
            );
        }
        KeysCommand::Ls => {
            let v = client.get_json("/spore/v1/keys")?;
            if out::json() {
                out::print_json(&v);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["NAME", "ACCESS KEY ID", "MAY", "CREATED"]);
            for k in v["Keys"].as_array().cloned().unwrap_or_default() {
                let s = |f: &str| k[f].as_str().unwrap_or("").to_owned();
                let scope = if k["InvokeOnly"].as_bool() == Some(true) {
                    format!("invoke {}", k["Functions"].as_str().unwrap_or("*"))
                } else {
                    "admin".to_owned()
                };
                t.row(vec![s("Name"), s("AccessKeyId"), scope, s("Created")]);
            }
            t.print();
        }
        KeysCommand::Rm { name } => {
            client.delete_key(&name)?;
            println!("removed access key {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore ui`.
pub fn ui(endpoint: &str, open: bool, quiet: bool) -> Result<ExitCode> {
    let v = Client::new(endpoint)?.ui_login_url()?;
    let url = format!(
        "{}{}",
        endpoint.trim_end_matches('/'),
        v["Path"].as_str().unwrap_or_default()
    );
    if out::json() {
        out::print_json(
            &serde_json::json!({ "Url": url, "ExpiresInSeconds": v["ExpiresInSeconds"] }),
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{url}");
    if quiet {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "one login, within {} s; the dashboard lives at {}/ui",
        v["ExpiresInSeconds"].as_u64().unwrap_or(0),
        endpoint.trim_end_matches('/')
    );
    if open {
        let status = std::process::Command::new("xdg-open")
            .arg(&url)
            .status()
            .context("running xdg-open (open the URL above by hand)")?;
        anyhow::ensure!(
            status.success(),
            "xdg-open failed: open the URL above by hand"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn mib_of(v: &serde_json::Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".to_owned(), |b| format!("{:.1} MiB", b / 1048576.0))
}

/// `spore ps`.
pub fn ps(endpoint: &str) -> Result<ExitCode> {
    let v = Client::new(endpoint)?.get_json("/spore/v1/processes")?;
    if out::json() {
        out::print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "KIND", "FUNCTION", "ID", "PIDS", "START", "STATE", ">AGE", ">MEMORY",
    ]);
    for p in v["Processes"].as_array().cloned().unwrap_or_default() {
        let pids: Vec<String> = p["pids"]
            .as_array()
            .map(|a| a.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default();
        let s = |k: &str| p[k].as_str().unwrap_or("").to_owned();
        t.row(vec![
            s("kind"),
            s("function"),
            s("id"),
            pids.join(","),
            s("start"),
            s("state"),
            age(p["age_s"].as_f64().unwrap_or(0.0)),
            mib_of(&p["memory_bytes"]),
        ]);
    }
    for p in v["Pipelines"].as_array().cloned().unwrap_or_default() {
        t.row(vec![
            "pipeline".into(),
            p["dag"].as_str().unwrap_or("").to_owned(),
            String::new(),
            format!("{} instances", p["instances"]),
            String::new(),
            format!("idle {}", age(p["idle_s"].as_f64().unwrap_or(0.0))),
            String::new(),
            String::new(),
        ]);
    }
    if t.is_empty() {
        println!("(nothing running: instances start at the first invocation)");
    } else {
        t.print();
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore describe NAME`.
pub fn describe(endpoint: &str, name: &str) -> Result<ExitCode> {
    let client = Client::new(endpoint)?;
    let conf = client.get_json(&format!("/2015-03-31/functions/{name}"))?;
    let procs = client.get_json("/spore/v1/processes")?;
    let status = client.get_json("/spore/v1/status")?;
    let mine = |a: &serde_json::Value, key: &str| -> Vec<serde_json::Value> {
        a.as_array()
            .into_iter()
            .flatten()
            .filter(|x| x[key] == name)
            .cloned()
            .collect()
    };
    let processes = mine(&procs["Processes"], "function");
    let recent = mine(&status["recent"], "function");
    let function = mine(&status["functions"], "name").pop().unwrap_or_default();
    let logs = client.log_events(name, 10, None, None)?;
    if out::json() {
        out::print_json(&serde_json::json!({
            "Function": conf,
            "Holds": function["stats"],
            "Image": function["image"],
            "Processes": processes,
            "Recent": recent,
            "Logs": logs,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let c = &conf["Configuration"];
    let s = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!("Function:     {}", s(&c["FunctionName"]));
    println!(
        "Runtime:      {}  (handler {})",
        s(&c["Runtime"]),
        s(&c["Handler"])
    );
    println!(
        "Sandbox:      {}  memory {} MB, timeout {} s",
        s(&c["SporeSandbox"]),
        c["MemorySize"],
        c["Timeout"]
    );
    println!(
        "Code:         {} bytes, sha256 {}",
        c["CodeSize"],
        s(&c["CodeSha256"])
    );
    println!(
        "Modified:     {}  (revision {})",
        s(&c["LastModified"]),
        s(&c["RevisionId"])
    );
    let held = &function["stats"];
    println!(
        "Holds:        {} idle, {} busy instances; template {}; spare {}; {} held",
        held["idle"].as_u64().unwrap_or(0),
        held["total"].as_u64().unwrap_or(0) - held["idle"].as_u64().unwrap_or(0),
        if held["template"] == true {
            "live"
        } else {
            "none"
        },
        if held["spare"] == true {
            "ready"
        } else {
            "none"
        },
        mib_of(&held["memory_bytes"]),
    );
    let image = &function["image"];
    if image.is_object() {
        println!(
            "Snapshot:     revision {}, {} codec, {} ({})",
            image["revision"],
            s(&image["codec"]),
            mib_of(&image["file_bytes"]),
            image["error"].as_str().unwrap_or("ok")
        );
    }
    let durations: Vec<f64> = recent
        .iter()
        .filter_map(|r| r["duration_ms"].as_f64())
        .collect();
    if !durations.is_empty() {
        let mut d = durations.clone();
        d.sort_by(f64::total_cmp);
        let errors = recent.iter().filter(|r| r["error"].is_string()).count();
        println!(
            "Recent calls: {} (errors {}), p50 {:.2} ms, p99 {:.2} ms",
            d.len(),
            errors,
            d[d.len() / 2],
            d[(d.len() * 99 / 100).min(d.len() - 1)]
        );
    }
    if !processes.is_empty() {
        println!("Processes:");
        for p in &processes {
            println!(
                "  {} {} {} ({}, {}) pids {}",
                s(&p["kind"]),
                s(&p["id"]),
                s(&p["state"]),
                s(&p["start"]),
                age(p["age_s"].as_f64().unwrap_or(0.0)),
                p["pids"]
            );
        }
    }
    if !logs.is_empty() {
        println!("Last log lines:");
        for e in &logs {
            println!(
                "  {}",
                out::printable(e["message"].as_str().unwrap_or_default())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore completions SHELL`.
pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    clap_complete::generate(shell, &mut cmd, "spore", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
