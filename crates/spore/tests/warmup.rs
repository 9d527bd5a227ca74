//! Automatic warm-up: what a function's calls import is imported by its later instances at
//! start-up (cfork templates, fresh containers, snapshots), with no `warmup_event`; off in
//! the manifest; turned off by itself when a module it would import starts a thread.

mod common;

use std::path::Path;

use common::{can_sandbox, Daemon};
use serde_json::{json, Value};

/// A handler that imports `lazymod` (and, when asked, `sneaky`) on its call, and says whether
/// they were there already.
const MAIN: &str = r#"
import sys

def handler(event, context):
    had = {m: m in sys.modules for m in ("lazymod", "sneaky")}
    import lazymod
    if event.get("sneaky"):
        import os, time
        tasks = lambda: os.stat("/proc/self/task").st_nlink
        before = tasks()
        import sneaky
        sneaky.T.join()
        # A joined thread may still be leaving the kernel for a moment, and the runtime
        # reports a call's imports only once its threads are back to what they were.
        end = time.monotonic() + 5
        while tasks() > before and time.monotonic() < end:
            time.sleep(0.001)
    if event.get("fragile"):
        import flag
        flag.CALLING = True
        import fragile
    if event.get("flaky"):
        import flag
        flag.CALLING = True
        import flaky
    return {"had": had, "value": lazymod.VALUE}
"#;

/// A module that starts a short thread at import: a call that imports it and waits for the
/// thread leaves none behind, but a template importing it ahead of a fork would have one.
const SNEAKY: &str = r#"
import threading, time
T = threading.Thread(target=time.sleep, args=(1.0,), daemon=True)
T.start()
"#;

/// A module that kills its runtime when imported outside a call: fine on the call that
/// records it, fatal to an instance (or template) that imports it at start-up.
const FRAGILE: &str = r#"
import os, flag
if not flag.CALLING:
    os._exit(3)
"#;

fn function(name: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(p.join("main.py"), MAIN).unwrap();
    std::fs::write(p.join("lazymod.py"), "VALUE = 42\n").unwrap();
    std::fs::write(p.join("sneaky.py"), SNEAKY).unwrap();
    std::fs::write(p.join("fragile.py"), FRAGILE).unwrap();
    std::fs::write(p.join("flag.py"), "CALLING = False\n").unwrap();
    std::fs::write(
        p.join("flaky.py"),
        "import flag\nif not flag.CALLING:\n    raise RuntimeError('only in a call')\n",
    )
    .unwrap();
    std::fs::write(
        p.join("spore.toml"),
        format!("name = \"{name}\"\nhandler = \"main.handler\"\ntimeout_s = 30\n{extra}\n"),
    )
    .unwrap();
    dir
}

/// Invokes with `X-Spore-Cold: how`; (start kind, body), failing on any error.
fn call(d: &Daemon, name: &str, how: &str, event: Value) -> (String, Value) {
    d.invoke_start(name, how, &event, &[])
}

fn had(v: &Value, module: &str) -> bool {
    v["had"][module].as_bool().unwrap_or_else(|| panic!("{v}"))
}

fn logs(d: &Daemon, name: &str) -> String {
    let out = d.cli(&["logs", name, "-n", "200"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_fork_after_the_first_call_has_what_it_imported() {
    if !can_sandbox("a_fork_after_the_first_call_has_what_it_imported") {
        return;
    }
    let mut d = Daemon::start();
    let f = function("wfork", "sandbox = \"cfork\"");
    d.deploy(f.path());
    let (start, v) = call(&d, "wfork", "1", json!({}));
    assert_eq!(start, "cold", "{v}");
    assert!(!had(&v, "lazymod"), "nothing recorded yet: {v}");
    assert_eq!(v["value"], 42);
    // The next fork asks the template to import it first.
    let (start, v) = call(&d, "wfork", "fork", json!({}));
    assert_eq!(start, "fork");
    assert!(
        had(&v, "lazymod"),
        "the template imported it before forking: {v}"
    );
    let (_, v) = call(&d, "wfork", "fork", json!({}));
    assert!(had(&v, "lazymod"), "{v}");
    // A new template (after a redeploy of the same code: a new revision) starts over...
    let (_, v) = call(&d, "wfork", "init", json!({}));
    assert!(
        had(&v, "lazymod"),
        "a new template of the same revision imports the list: {v}"
    );
    assert!(
        logs(&d, "wfork").contains("automatic warm-up imported 1 modules"),
        "{}",
        logs(&d, "wfork")
    );
    // ...and the list survives a daemon restart on the same data dir.
    let data = d.data.clone();
    d.stop();
    let mut d = Daemon::start_at(&data, &[]);
    let (start, v) = call(&d, "wfork", "1", json!({}));
    assert_eq!(start, "cold");
    assert!(had(&v, "lazymod"), "kept across a restart: {v}");
    d.stop();
}

#[test]
fn fresh_containers_import_the_list_unless_the_manifest_turns_it_off() {
    if !can_sandbox("fresh_containers_import_the_list_unless_the_manifest_turns_it_off") {
        return;
    }
    let mut d = Daemon::start();
    let on = function("won", "");
    let off = function("woff", "auto_warmup = false");
    d.deploy(on.path());
    d.deploy(off.path());
    for name in ["won", "woff"] {
        let (_, v) = call(&d, name, "init", json!({}));
        assert!(!had(&v, "lazymod"), "{name}: {v}");
    }
    let (_, v) = call(&d, "won", "init", json!({}));
    assert!(had(&v, "lazymod"), "won: {v}");
    let (_, v) = call(&d, "woff", "init", json!({}));
    assert!(!had(&v, "lazymod"), "auto_warmup = false: {v}");
    assert!(
        !d.data.join("warmup/woff.json").exists(),
        "with auto_warmup = false the runtime reports nothing to record"
    );
    assert!(d.data.join("warmup/won.json").exists());
    // GetFunction shows the setting as a tag.
    let got = d.get_json("/2015-03-31/functions/woff");
    assert_eq!(got["Tags"]["spore:auto_warmup"], "false", "{got}");
    // A new revision (new code) starts with an empty list.
    std::fs::write(on.path().join("lazymod.py"), "VALUE = 43\n").unwrap();
    let r = d
        .http
        .put(d.url("/2015-03-31/functions/won/code"))
        .json(&json!({ "ZipFile": zip_b64(on.path()) }))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let (_, v) = call(&d, "won", "init", json!({}));
    assert_eq!(v["value"], 43, "{v}");
    assert!(!had(&v, "lazymod"), "a new revision starts over: {v}");
    d.stop();
}

#[test]
fn a_module_that_starts_a_thread_turns_the_warm_up_off_and_the_call_still_succeeds() {
    if !can_sandbox(
        "a_module_that_starts_a_thread_turns_the_warm_up_off_and_the_call_still_succeeds",
    ) {
        return;
    }
    let mut d = Daemon::start();
    let f = function("wthread", "sandbox = \"cfork\"");
    d.deploy(f.path());
    let (_, v) = call(&d, "wthread", "1", json!({"sneaky": true}));
    assert!(!had(&v, "sneaky"), "{v}");
    // The template imports `sneaky` before this fork, gets a thread, cannot fork: the
    // warm-up goes off and a new template serves the call.
    let (start, v) = call(&d, "wthread", "fork", json!({"sneaky": true}));
    assert!(!had(&v, "sneaky"), "{start}: {v}");
    assert!(
        d.log_text().contains("automatic warm-up turned off"),
        "{}",
        d.log_text()
    );
    // It stays off for this revision: forks work and import nothing ahead.
    for _ in 0..2 {
        let (start, v) = call(&d, "wthread", "fork", json!({"sneaky": true}));
        assert_eq!(start, "fork");
        assert!(!had(&v, "sneaky") && !had(&v, "lazymod"), "{v}");
    }
    d.stop();
}

#[test]
fn a_list_that_breaks_starts_is_turned_off_and_the_calls_still_succeed() {
    if !can_sandbox("a_list_that_breaks_starts_is_turned_off_and_the_calls_still_succeed") {
        return;
    }
    let mut d = Daemon::start();
    // A container: its next start imports `fragile` at start-up and dies; the start is
    // retried without the list, which is turned off.
    let c = function("wfragc", "");
    d.deploy(c.path());
    let (_, v) = call(&d, "wfragc", "init", json!({"fragile": true}));
    assert!(!had(&v, "lazymod"), "{v}");
    assert!(d.data.join("warmup/wfragc.json").exists());
    let (start, v) = call(&d, "wfragc", "init", json!({"fragile": true}));
    assert_eq!(start, "cold");
    assert!(!had(&v, "lazymod"), "started without the list: {v}");
    let stored = std::fs::read_to_string(d.data.join("warmup/wfragc.json")).unwrap();
    assert!(stored.contains("\"off\""), "{stored}");
    assert!(
        logs(&d, "wfragc").contains("automatic warm-up turned off"),
        "the function's log says why: {}",
        logs(&d, "wfragc")
    );
    let (_, v) = call(&d, "wfragc", "init", json!({"fragile": true}));
    assert!(!had(&v, "lazymod"), "it stays off: {v}");
    // A cfork template: the live template imports `fragile` before the next fork and dies;
    // a new one without the list serves; one started from scratch later works too.
    let f = function("wfragf", "sandbox = \"cfork\"");
    d.deploy(f.path());
    let (_, v) = call(&d, "wfragf", "1", json!({"fragile": true}));
    assert!(!had(&v, "lazymod"), "{v}");
    let (_, v) = call(&d, "wfragf", "fork", json!({"fragile": true}));
    assert!(!had(&v, "lazymod"), "{v}");
    let (_, v) = call(&d, "wfragf", "init", json!({"fragile": true}));
    assert!(
        !had(&v, "lazymod"),
        "a new template imports nothing extra: {v}"
    );
    let (start, _) = call(&d, "wfragf", "fork", json!({"fragile": true}));
    assert_eq!(start, "fork");
    // A template started from scratch with the list that dies is retried without it.
    let g = function("wfragg", "sandbox = \"cfork\"");
    d.deploy(g.path());
    let (_, v) = call(&d, "wfragg", "1", json!({"fragile": true}));
    assert!(!had(&v, "lazymod"), "{v}");
    let (start, v) = call(&d, "wfragg", "init", json!({"fragile": true}));
    assert_eq!(start, "cold", "{v}");
    assert!(!had(&v, "lazymod"), "{v}");
    let stored = std::fs::read_to_string(d.data.join("warmup/wfragg.json")).unwrap();
    assert!(stored.contains("\"off\""), "{stored}");
    d.stop();
}

#[test]
fn a_module_that_fails_at_start_up_leaves_the_list() {
    if !can_sandbox("a_module_that_fails_at_start_up_leaves_the_list") {
        return;
    }
    let mut d = Daemon::start();
    let f = function("wflaky", "");
    d.deploy(f.path());
    let list = d.data.join("warmup/wflaky.json");
    let stored = || -> Value { serde_json::from_slice(&std::fs::read(&list).unwrap()).unwrap() };
    call(&d, "wflaky", "init", json!({"flaky": true}));
    assert!(
        stored()["modules"].to_string().contains("flaky"),
        "{}",
        stored()
    );
    // The next start fails to import it (and says so); its call reports that, and the list
    // drops it for good, though that call imports it again.
    let (_, v) = call(&d, "wflaky", "init", json!({"flaky": true}));
    assert!(had(&v, "lazymod"), "the rest of the list was imported: {v}");
    assert!(logs(&d, "wflaky").contains("not imported: flaky (RuntimeError)"));
    let s = stored();
    assert!(!s["modules"].to_string().contains("flaky"), "{s}");
    assert!(s["skip"].to_string().contains("flaky"), "{s}");
    call(&d, "wflaky", "init", json!({"flaky": true}));
    assert!(
        !stored()["modules"].to_string().contains("flaky"),
        "{}",
        stored()
    );
    d.stop();
}

#[test]
fn a_function_made_again_under_a_deleted_ones_name_starts_with_no_list() {
    if !can_sandbox("a_function_made_again_under_a_deleted_ones_name_starts_with_no_list") {
        return;
    }
    let mut d = Daemon::start();
    let f = function("wagain", "");
    d.deploy(f.path());
    let (_, v) = call(&d, "wagain", "init", json!({}));
    assert!(!had(&v, "lazymod"), "{v}");
    let (_, v) = call(&d, "wagain", "init", json!({}));
    assert!(had(&v, "lazymod"), "{v}");
    let list = d.data.join("warmup/wagain.json");
    let old = std::fs::read(&list).unwrap();
    let out = d.cli(&["rm", "wagain"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!list.exists());
    // As if a call of the deleted function, still running, had recorded its list after the
    // delete; then a function of the same name and code is made: revision 1 again.
    std::fs::write(&list, old).unwrap();
    d.deploy(f.path());
    let (_, v) = call(&d, "wagain", "init", json!({}));
    assert!(
        !had(&v, "lazymod"),
        "a list of another function is not used: {v}"
    );
    d.stop();
}

#[test]
fn the_runtime_stops_importing_the_list_past_its_time_budget() {
    if !can_sandbox("the_runtime_stops_importing_the_list_past_its_time_budget") {
        return;
    }
    let mut d = Daemon::start();
    // Four modules of 2 s each: a call imports them all in 8 s; at start-up the budget
    // (half of the 10 s start limit) stops the list before the fourth.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(
        p.join("main.py"),
        "import sys\n\ndef handler(event, context):\n    had = {m: m in sys.modules for m in \
         ('slow1', 'slow4')}\n    import slow1, slow2, slow3, slow4\n    return {'had': had}\n",
    )
    .unwrap();
    for i in 1..=4 {
        std::fs::write(
            p.join(format!("slow{i}.py")),
            "import time\ntime.sleep(2)\n",
        )
        .unwrap();
    }
    std::fs::write(
        p.join("spore.toml"),
        "name = \"wslow\"\nhandler = \"main.handler\"\ntimeout_s = 9\n",
    )
    .unwrap();
    d.deploy(p);
    let (_, v) = call(&d, "wslow", "init", json!({}));
    assert!(!had(&v, "slow1"), "{v}");
    let (start, v) = call(&d, "wslow", "init", json!({}));
    assert_eq!(start, "cold");
    assert!(had(&v, "slow1"), "the list's start was imported: {v}");
    assert!(!had(&v, "slow4"), "the rest waits for the call: {v}");
    let log = logs(&d, "wslow");
    assert!(log.contains("past the 5000 ms budget"), "{log}");
    d.stop();
}

#[test]
fn a_snapshot_is_retaken_with_the_modules_the_calls_import() {
    if !can_sandbox("a_snapshot_is_retaken_with_the_modules_the_calls_import") {
        return;
    }
    let mut d = Daemon::start();
    let f = function("wsnap", "snapshot = true");
    d.deploy(f.path());
    let (start, v) = call(&d, "wsnap", "init", json!({}));
    assert_eq!(start, "cold");
    assert!(!had(&v, "lazymod"), "{v}");
    // The first snapshot lacked `lazymod`: it was discarded, and the next start takes one
    // that has it, which later restores show.
    let (_, v) = call(&d, "wsnap", "init", json!({}));
    assert!(had(&v, "lazymod"), "{v}");
    let (start, v) = call(&d, "wsnap", "restore", json!({}));
    assert_eq!(start, "restore");
    assert!(
        had(&v, "lazymod"),
        "restored from the retaken snapshot: {v}"
    );
    d.stop();
}

fn zip_b64(dir: &Path) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(spore_registry::code::zip_dir(dir).unwrap())
}
