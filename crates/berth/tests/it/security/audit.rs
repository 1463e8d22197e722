//! The lifecycle operations that move content back (a tag restore, an
//! undelete) are audited with who did them, and tag history names the user
//! behind every value.

use super::*;

#[tokio::test]
async fn restores_and_undeletes_are_audited_and_history_names_the_user() {
    let mut s = Secured::start(Options::new()).await;
    s.reg.set_client(client_with(Some(&basic(ALICE))));
    let first = Image::oci(fresh_seed(), 1, 1_000);
    let second = Image::oci(fresh_seed(), 1, 1_000);
    first.push(&s.reg, "team/app", Some("v1")).await;
    second.push(&s.reg, "team/app", Some("v1")).await;

    // alice moves the tag back, deletes it and brings it back.
    let run = |args: &[&str]| {
        let out = s.cli(ALICE).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "berth {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&["tags", "restore", "team/app:v1", &first.digest]);
    let r = s.reg.delete("/v2/team/app/manifests/v1").await;
    assert_eq!(r.status, 202, "{}", r.describe());
    run(&["undelete", "team/app:v1"]);
    assert_eq!(
        s.reg.get("/v2/team/app/manifests/v1").await.digest_header(),
        Some(first.digest.clone())
    );
    // bob may only pull: both are refused, and audited as denied.
    let out = s
        .cli(BOB)
        .args(["tags", "restore", "team/app:v1", &second.digest])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let events = s.audit_events();
    let find = |event: &str, identity: &str| {
        events
            .iter()
            .find(|e| e["event"] == event && e["identity"] == identity)
            .unwrap_or_else(|| panic!("no {event} by {identity} in {events:#?}"))
            .clone()
    };
    let e = find("tag_restore", "user:alice");
    assert_eq!(e["outcome"], "ok", "{e}");
    assert_eq!(e["repository"], "team/app");
    assert_eq!(e["reference"], "v1");
    assert_eq!(e["digest"], first.digest);
    let e = find("undelete", "user:alice");
    assert_eq!(e["outcome"], "ok", "{e}");
    assert_eq!(e["repository"], "team/app");
    assert_eq!(e["reference"], "v1");
    let e = find("denied", "user:bob");
    assert_eq!(e["path"], "/berth/v1/tags/restore", "{e}");
    assert_eq!(e["repository"], "team/app", "{e}");
    assert_eq!(e["status"], 403, "{e}");

    // Every value in the history, with its author (root reads it).
    let out = s
        .cli(ROOT)
        .args(["tags", "history", "team/app:v1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = history["history"].as_array().unwrap();
    assert!(entries.len() >= 3, "{history:#}");
    assert!(
        entries.iter().all(|e| e["by"] == "user:alice"),
        "{history:#}"
    );
}
