//! The files under `deploy/`: every metric (and label) the Grafana
//! dashboard and the Prometheus rules name exists on a running node's
//! `/metrics`, the rules pass `promtool check rules`, and the example
//! deployments parse.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::security::{ALICE, basic, client_with};

use crate::support::*;
use crate::ui::{Console, start_console};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every `berth_*` series name in `text`, with the label names its
/// selectors use and the values of exact matches
/// (`berth_x{a="1", b=~"2"}` gives `berth_x: {a, a=1, b}`).
fn referenced(text: &str, into: &mut BTreeMap<String, BTreeSet<String>>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("berth_") {
        let start = i + at;
        // Not the tail of another word (`xberth_`).
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            i = start + 6;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let labels = into.entry(text[start..end].to_string()).or_default();
        if bytes.get(end) == Some(&b'{')
            && let Some(close) = text[end..].find('}')
        {
            for matcher in text[end + 1..end + close].split(',') {
                let matcher = matcher.trim();
                let key: String = matcher
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if key.is_empty() {
                    continue;
                }
                // An exact match names a value too: `key=value`.
                if let Some(value) = matcher[key.len()..].trim_start().strip_prefix("=\"")
                    && let Some(value) = value.strip_suffix('"')
                {
                    labels.insert(format!("{key}={value}"));
                }
                labels.insert(key);
            }
        }
        i = end;
    }
}

/// The series on `/metrics`: name to the label names its samples carry,
/// and `name=value` for each value seen.
fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_string()).or_default();
        if line[name_end..].starts_with('{')
            && let Some(close) = line.find('}')
        {
            for pair in line[name_end + 1..close].split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    labels.insert(k.trim().to_string());
                    labels.insert(format!("{}={}", k.trim(), v.trim().trim_matches('"')));
                }
            }
        }
    }
    out
}

fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| dashboard_exprs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// Drives what makes every labelled family show a series: pushes, a pull
/// through the cache and a miss upstream, a refused password, a backup, a
/// replication round.
async fn exercise(console: &Console) {
    let eu = &console.eu;
    Image::oci(fresh_seed(), 2, 3000)
        .push(eu, "team/app", Some("1"))
        .await;
    // Something for eu to copy from us.
    Image::oci(fresh_seed(), 1, 3000)
        .push(&console.us, "team/from-us", Some("1"))
        .await;
    let cached = Image::oci(fresh_seed(), 1, 2000);
    crate::upstream::Pusher::new(&console.upstream.url(), None)
        .image("library/alpine", "3", &cached)
        .await;
    let r = eu.get("/v2/docker.io/library/alpine/manifests/3").await;
    assert_eq!(r.status, 200, "{}", r.describe());
    let r = eu.get("/v2/docker.io/library/absent/manifests/1").await;
    assert_eq!(r.status, 404, "{}", r.describe());
    let wrong = client_with(Some(&basic((ALICE.0, "wrong"))));
    let r = send(wrong.get(format!("{}/v2/", eu.url()))).await;
    assert_eq!(r.status, 401);
    let r = send(eu.req(reqwest::Method::POST, "/berth/v1/backups")).await;
    assert_eq!(r.status, 200, "{}", r.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_rules_name_exists() {
    if !crate::upstream::distribution_available() || !crate::pki::tools_available() {
        return;
    }
    let Some(etcd) = start_etcd().await else {
        return;
    };
    let backups = tempfile::tempdir().unwrap();
    let console = start_console(
        Options::new()
            .flag(
                "--metadata",
                format!("etcd://127.0.0.1:{}/deploy-test", etcd.port),
            )
            .flag("--backup-to", backups.path().display())
            .flag("--backup-every", "1h"),
    )
    .await;
    exercise(&console).await;

    let mut wanted = BTreeMap::new();
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/berth-rules.yml")).unwrap();
    let rule_text: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    referenced(&rule_text, &mut wanted);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana/berth-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 25,
        "the dashboard has its panels: {}",
        exprs.len()
    );
    for e in &exprs {
        referenced(e, &mut wanted);
    }
    assert!(wanted.len() >= 25, "names found: {wanted:?}");

    // The gauges of the region and the replication round come a few seconds
    // after start: wait until everything wanted is there, then report what
    // is missing.
    // The values the rules select on that this run cannot show (a failed
    // backup, a stale answer), each a literal of the code that emits it;
    // every other value must be on /metrics.
    const ONLY_ON_FAILURE: &[(&str, &str, &str)] = &[
        (
            "berth_backup_runs_total",
            "outcome=failed",
            "crates/server/src/backup.rs",
        ),
        (
            "berth_cache_requests_total",
            "result=stale",
            "crates/proxy/src/cache/manifests.rs",
        ),
    ];
    let crates = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let have = exposed(&console.eu.get("/metrics").await.text());
        let mut missing = Vec::new();
        for (name, labels) in &wanted {
            match have.get(name) {
                None => missing.push(format!("{name} (not exposed)")),
                Some(exposed_labels) => {
                    for l in labels {
                        let emitted = ONLY_ON_FAILURE.iter().any(|(metric, label, file)| {
                            *metric == name
                                && label == l
                                && std::fs::read_to_string(crates.join(file)).is_ok_and(|src| {
                                    src.contains(&format!(
                                        "\"{}\"",
                                        label.split_once('=').unwrap().1
                                    ))
                                })
                        });
                        if !exposed_labels.contains(l) && !emitted {
                            missing.push(format!("{name}{{{l}}} (no such label or value)"));
                        }
                    }
                }
            }
        }
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "named by deploy/ but not on /metrics: {missing:#?}; replication: {}",
        console.eu.get("/berth/v1/replication/status").await.text()
    );

    // The availability gauges tell the truth on etcd: one member, reachable,
    // with a leader; this node ready.
    let lines = [
        "berth_etcd_members 1",
        "berth_etcd_members_reachable 1",
        "berth_etcd_has_leader 1",
        "berth_node_ready 1",
        "berth_region_nodes{state=\"ready\"} 1",
    ];
    let all_there = eventually(Duration::from_secs(15), || async {
        let have = console.eu.get("/metrics").await.text();
        lines.iter().all(|line| have.lines().any(|l| l == *line))
    })
    .await;
    assert!(
        all_there,
        "{lines:?} in:\n{}",
        console.eu.get("/metrics").await.text()
    );
    // An operator signs in to the console while etcd is up...
    let base = console.eu.url();
    // Bounded: the console must answer through the outage, not hang.
    let http = client_builder_trusting(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    let login = send(http.get(format!("{base}/ui/login"))).await;
    let csrf_cookie = login.header("set-cookie").unwrap();
    let csrf = csrf_cookie
        .strip_prefix("__Host-berth_csrf=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (user, password) = crate::security::ROOT;
    let r = send(
        http.post(format!("{base}/ui/login"))
            .header("cookie", format!("__Host-berth_csrf={csrf}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={csrf}&user={user}&password={password}&next=/ui/"
            )),
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.describe());
    let session = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let overview = || {
        send(
            http.get(format!("{base}/ui/"))
                .header("cookie", session.clone()),
        )
    };
    let page = overview().await;
    assert!(
        page.text().contains("quorum</span>: 1 of 1 reachable"),
        "{}",
        page.text()
    );

    drop(etcd);
    // With etcd gone, the node says so within a few looks.
    assert!(
        eventually(Duration::from_secs(30), || async {
            let m = console.eu.get("/metrics").await.text();
            m.lines().any(|l| l == "berth_node_ready 0")
                && m.lines().any(|l| l == "berth_etcd_members_reachable 0")
        })
        .await,
        "readiness and quorum gauges follow etcd's loss: {}",
        console.eu.log_tail(20)
    );
    // ...and keeps it through the outage: the overview says what is wrong.
    let page = overview().await;
    assert_eq!(page.status, 200, "{}", page.describe());
    let text = page.text();
    assert!(text.contains("not ready: "), "{text}");
    assert!(
        text.contains("No etcd member answers") || text.contains("NO QUORUM"),
        "{text}"
    );
}

#[test]
fn the_rules_pass_promtool() {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("BERTH_REQUIRE_PROMTOOL").is_none(),
            "promtool is not installed but BERTH_REQUIRE_PROMTOOL is set"
        );
        eprintln!("SKIPPED: promtool is not installed");
        return;
    }
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(deploy_dir().join("prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    promtool(&["check", "rules", "berth-rules.yml"]);
    // The rules' own unit tests: synthetic series in, alerts out.
    promtool(&["test", "rules", "berth-rules.test.yml"]);
    // A rule file with a mistake fails, so the check above can fail.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(&bad, "groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(berth_http_requests_total[5m]\n").unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "promtool refuses a broken rule");
}

#[test]
fn the_scanner_finds_names_and_labels() {
    let mut m = BTreeMap::new();
    referenced(
        r#"sum(rate(berth_http_requests_total{status=~"5..", route!="x", method="GET"}[5m])) / xberth_no + berth_up"#,
        &mut m,
    );
    assert_eq!(m.len(), 2, "{m:?}");
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        m["berth_http_requests_total"],
        set(&["status", "route", "method", "method=GET"])
    );
    let e = exposed("# TYPE x counter\nberth_a_total{peer=\"us\",kind=\"b\"} 3\nberth_b 1\n");
    assert_eq!(
        e["berth_a_total"],
        set(&["peer", "peer=us", "kind", "kind=b"])
    );
    assert!(e["berth_b"].is_empty());
}

/// Every `BERTH_*` variable in `text` that `berth serve` does not know.
fn unknown_variables(text: &str) -> Vec<String> {
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut unknown = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("BERTH_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `BERTH_*` in prose names no variable.
        if name.len() > "BERTH_".len()
            && !help.contains(&format!("env: {name}="))
            && !unknown.contains(&name)
        {
            unknown.push(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    unknown
}

#[test]
fn the_systemd_unit_verifies_and_names_real_settings() {
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/berth.service")).unwrap();
    let env = std::fs::read_to_string(deploy_dir().join("systemd/berth.env.example")).unwrap();
    assert_eq!(unknown_variables(&unit), Vec::<String>::new());
    assert_eq!(unknown_variables(&env), Vec::<String>::new());
    assert!(
        unknown_variables("BERTH_NO_SUCH_SETTING=1").len() == 1,
        "the check can fail"
    );
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    // The unit as installed, with the binary under test in its place.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/berth", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about this unit (not about the host's own units).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("berth.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

#[test]
fn the_kubernetes_manifests_describe_a_region() {
    let script = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    with open(path) as f:
        out.extend(d for d in yaml.safe_load_all(f) if d)
print(json.dumps(out))
"#;
    let dir = deploy_dir().join("kubernetes");
    let files: Vec<PathBuf> = ["berth.yaml", "etcd.yaml", "garage.yaml"]
        .iter()
        .map(|f| dir.join(f))
        .collect();
    let Ok(out) = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
    else {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    };
    if String::from_utf8_lossy(&out.stderr).contains("No module named 'yaml'") {
        eprintln!("SKIPPED: python3 has no yaml module");
        return;
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let berth = find("StatefulSet", "berth");
    assert_eq!(berth["spec"]["replicas"], 3);
    let container = &berth["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter(|n| n.starts_with("BERTH_"))
        .collect();
    assert_eq!(unknown_variables(&env.join(" ")), Vec::<String>::new());
    // The nodes advertise names their certificate can cover, not pod IPs.
    let advertise = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "BERTH_ADVERTISE_URL")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    let service = berth["spec"]["serviceName"].as_str().unwrap();
    // A wildcard covers one label and needs two after it (rustls): the
    // name is POD.SERVICE.NAMESPACE.svc, for *.SERVICE.NAMESPACE.svc.
    assert!(
        advertise.contains(&format!("$(POD_NAME).{service}.$(POD_NAMESPACE).svc:")),
        "{advertise}"
    );
    assert!(container["env"].to_string().contains("\"POD_NAMESPACE\""));
    assert_eq!(find("Service", service)["spec"]["clusterIP"], "None");
    // etcd's image has no shell: no command may need one.
    let etcd = &find("StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"][0];
    assert!(!etcd["command"].to_string().contains("/bin/sh"), "{etcd}");
    for set in ["etcd", "garage"] {
        assert_eq!(find("StatefulSet", set)["spec"]["replicas"], 3, "{set}");
    }
    for pdb in ["berth", "etcd", "garage"] {
        let spec = &find("PodDisruptionBudget", pdb)["spec"];
        assert!(
            spec["minAvailable"] == 2 || spec["maxUnavailable"] == 1,
            "{pdb}: {spec}"
        );
    }
    // The Deployment's etcd endpoints are the StatefulSet's members.
    let metadata = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "BERTH_METADATA")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..3 {
        assert!(
            metadata.contains(&format!("etcd-{i}.etcd:2379")),
            "{metadata}"
        );
    }
}
