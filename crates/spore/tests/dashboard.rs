//! The web dashboard, in a real browser (Debian's headless Chromium driven by Selenium): a
//! one-time login URL from `spore ui`, the deployed functions and their instances on the page,
//! an invocation from the page, and its log line arriving live. Also who may not see it:
//! no session, a wrong key, an invoke-only key, a used login URL, and a cookie-authenticated
//! change without the dashboard's header.

mod common;

use std::process::Command;

use common::{can_sandbox, fixture, repo_root, Daemon};
use serde_json::json;

const BROWSER: &str = r#"
import sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, shot = sys.argv[1], sys.argv[2]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1500,1450"]:
    opts.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
wait = WebDriverWait(d, 30)
text = lambda id: d.find_element(By.ID, id).text
try:
    d.get(url)
    wait.until(lambda d: d.current_url.endswith("/ui"))
    # The deployed functions and the warm instance the test's invocation left.
    wait.until(lambda d: "echo" in text("functions") and "echo-fork" in text("functions"))
    row = lambda: d.find_element(By.CSS_SELECTOR, 'tr[data-fn="echo"]')
    wait.until(lambda d: row().find_elements(By.TAG_NAME, "td")[5].text == "1")
    # Invoke from the page; the result shows, and the log line arrives live.
    box = row().find_element(By.CSS_SELECTOR, "input.payload")
    box.clear()
    box.send_keys('{"from": "browser"}')
    row().find_element(By.CSS_SELECTOR, "button.invoke").click()
    wait.until(lambda d: "browser" in text("invoke-result"))
    wait.until(lambda d: "START RequestId" in text("log") and "REPORT RequestId" in text("log"))
    wait.until(lambda d: "warm" in text("recent"))
    # Instances by start path, and the cfork template.
    wait.until(lambda d: "template" in text("procs") and "cold" in text("procs"))
    d.save_screenshot(shot)
    print("dashboard OK")
finally:
    d.quit()
"#;

/// A login form's body.
fn form(id: &str, secret: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!(
        "access_key_id={}&secret_access_key={}",
        enc(id),
        enc(secret)
    )
}

fn status(r: &reqwest::blocking::Response) -> u16 {
    r.status().as_u16()
}

#[test]
fn the_dashboard_shows_functions_invokes_and_tails_logs_in_a_browser() {
    if !can_sandbox("the_dashboard_shows_functions_invokes_and_tails_logs_in_a_browser") {
        return;
    }
    let test_python = repo_root().join("target/test-python");
    let have_browser = std::path::Path::new("/usr/bin/chromium").exists()
        && std::path::Path::new("/usr/bin/chromedriver").exists()
        && test_python.join("selenium").is_dir();
    let mut d = Daemon::start();
    d.deploy(&fixture("echo"));
    d.deploy_cfork(&fixture("echo"), "echo-fork");
    let (err, _, _) = d.invoke("echo", json!({}));
    assert!(!err);

    // Who may not: no session, wrong keys, an invoke-only key.
    let raw = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = raw.get(d.url("/ui")).send().unwrap();
    assert_eq!(status(&r), 303, "no session: to the login page");
    assert_eq!(raw.get(d.url("/ui/login")).send().unwrap().status(), 200);
    let r = raw
        .post(d.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form("SPKNOSUCHKEY", "x"))
        .send()
        .unwrap();
    assert_eq!(status(&r), 401);
    assert_eq!(
        raw.get(d.url("/spore/v1/status")).send().unwrap().status(),
        403,
        "the dashboard's data needs a session or a key"
    );
    let out = d.cli(&["keys", "create", "inv", "--invoke-only"]);
    let creds =
        spore_auth::credentials::parse_profile(&String::from_utf8_lossy(&out.stdout), "inv")
            .unwrap();
    let r = raw
        .post(d.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&creds.access_key_id, &creds.secret_access_key))
        .send()
        .unwrap();
    assert_eq!(status(&r), 403, "an invoke-only key cannot log in");

    // The admin key logs in: a session cookie, HttpOnly and SameSite=Strict.
    let admin = spore_auth::credentials::read_profile(&d.data.join("credentials"), "default")
        .unwrap()
        .unwrap();
    let r = raw
        .post(d.url("/ui/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&admin.access_key_id, &admin.secret_access_key))
        .send()
        .unwrap();
    assert_eq!(status(&r), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let r = raw
        .get(d.url("/spore/v1/status"))
        .header("cookie", &session)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // A change through the cookie alone (what another site's form could send) is refused.
    let r = raw
        .delete(d.url("/2015-03-31/functions/echo"))
        .header("cookie", &session)
        .send()
        .unwrap();
    assert_eq!(status(&r), 403);
    assert!(r.text().unwrap().contains("X-Spore-UI"));

    // `spore ui` prints a one-time URL.
    let out = d.cli(&["ui"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        url.starts_with(&d.endpoint) && url.contains("/ui/login?token="),
        "{url}"
    );

    if !have_browser {
        assert_ne!(
            std::env::var("SPORE_REQUIRE_ROOT").as_deref(),
            Ok("1"),
            "chromium, chromedriver or selenium are missing; run scripts/setup.sh"
        );
        eprintln!("SKIP the browser part of the dashboard test: chromium, chromium-driver or selenium not installed (scripts/setup.sh installs them)");
        d.stop();
        return;
    }
    let shot = repo_root().join("target/dashboard.png");
    let out = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(BROWSER)
        .arg(&url)
        .arg(&shot)
        .env("PYTHONPATH", &test_python)
        .env("SE_AVOID_STATS", "true")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("dashboard OK"),
        "stdout: {stdout}\nstderr: {}\ndaemon: {}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert!(shot.exists());
    // The login URL worked once.
    let r = raw.get(&url).send().unwrap();
    assert_eq!(status(&r), 401, "a used login URL is refused");
    d.stop();
}
