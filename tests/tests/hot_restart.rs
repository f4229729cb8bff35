//! Hot restart: a new agent on the same pins takes over while requests keep coming; none fails,
//! and a connection open on the old agent keeps flowing while the old agent drains.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use authz_tests::*;

#[test]
fn a_new_agent_takes_over_without_a_failed_request_and_the_old_one_drains() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let pod = net.host("p", 2).unwrap();
    let w = net.host("w", 3).unwrap();
    let pace = Pace::measure(&pod);
    net.serve(&w, "http", 8000).unwrap();
    net.serve(&w, "echo", 9000).unwrap();
    let cfg = one_pod_config(&pod, &w, ", drainTimeout: 2s");
    let mut old = Agent::start(&cfg).unwrap();
    old.cleanup_on_drop = false;

    // A long-lived connection through the old agent.
    let mut nc = Echo::open(&pod, &w.ip, 9000);
    assert_eq!(nc.echo("one").as_deref(), Some("one"));

    // Requests all along the handover.
    // (Windows stretched to a few attempts at this machine's pace, so there are requests in each.)
    let load = Load::start(&pod, &format!("http://{}:8000/", w.ip));
    std::thread::sleep(Duration::from_millis(300) + pace.attempts(3));
    let new = Agent::start_pinned(&cfg, &[], &old.bpffs).unwrap();
    std::thread::sleep(Duration::from_millis(300) + pace.attempts(3));
    let redirected_by_new = new.metric("authz_connections_redirected_total");

    // SIGTERM the old agent: it stops accepting, the open connection keeps flowing while it drains.
    let t = Instant::now();
    unsafe { libc::kill(old.child.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(700));
    assert!(old.child.try_wait().unwrap().is_none(), "still draining");
    assert_eq!(
        nc.echo("two").as_deref(),
        Some("two"),
        "open connection not cut while draining"
    );
    let st = old.stop().unwrap();
    assert!(st.success(), "{}", old.log_text());
    assert!(
        t.elapsed() < pace.after(Duration::from_secs(5)),
        "drain bounded by drainTimeout"
    );
    assert!(
        old.log_text().contains("drain timeout"),
        "{}",
        old.log_text()
    );
    std::thread::sleep(Duration::from_millis(300) + pace.attempts(3));

    let (n, bad) = load.stop_not_ok();
    assert!(n >= 10, "requests made during the handover: {n}");
    assert!(
        bad.is_empty(),
        "{} of {n} requests failed: {bad:?}",
        bad.len()
    );
    assert!(
        new.metric("authz_connections_redirected_total") > redirected_by_new,
        "the new agent serves"
    );
    let (code, _) = curl(&pod, true, &[&format!("http://{}:8000/", w.ip)]).unwrap();
    assert_eq!(code, 200);
}

/// On SIGTERM an idle keep-alive HTTP connection is closed at once (not held until drainTimeout)
/// and a request in flight still gets its answer.
#[test]
fn a_stopping_agent_closes_idle_http_connections_and_finishes_requests() {
    if !require_root() {
        return;
    }
    let mut net = Net::new().unwrap();
    let pod = net.host("p", 2).unwrap();
    let w = net.host("w", 3).unwrap();
    let pace = Pace::measure(&pod);
    net.serve(&w, "http", 8000).unwrap();
    // Timed at this machine's pace: the upload is still in flight when the agent stops (it
    // starts a few process spawns after the idle request), and lasts well under drainTimeout.
    let settle = Duration::from_millis(700) + pace.attempts(2);
    let upload_secs = settle.as_secs() + 2;
    let cfg = one_pod_config(&pod, &w, ", drainTimeout: 60s");
    let mut agent = Agent::start(&cfg).unwrap();
    // One request on a keep-alive connection, then the connection stays idle; `cat` ends when
    // the agent closes it.
    let script = format!(
        "exec 3<>/dev/tcp/{}/8000; printf 'GET /idle HTTP/1.1\\r\\nHost: w\\r\\n\\r\\n' >&3; timeout {} cat <&3",
        w.ip,
        upload_secs + pace.after(Duration::from_secs(15)).as_secs()
    );
    let idle = Net::command(&pod, true, "bash", &["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // A request in flight when the agent stops: an upload that trickles in at 1 MB/s.
    let url = format!("http://{}:8000/upload", w.ip);
    let upload = Net::command(
        &pod,
        true,
        "bash",
        &[
            "-c",
            &format!(
                "head -c {} /dev/zero | curl -sS -m {} --limit-rate 1M -o /dev/null -w '%{{http_code}}' --data-binary @- {url}",
                upload_secs * 1_000_000,
                upload_secs + pace.after(Duration::from_secs(10)).as_secs()
            ),
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(settle);
    let t = Instant::now();
    let st = agent.stop().unwrap();
    assert!(st.success(), "{}", agent.log_text());
    assert!(
        t.elapsed() < Duration::from_secs(upload_secs) + pace.after(Duration::from_secs(5)),
        "the agent did not wait for the idle connection: {:?}",
        t.elapsed()
    );
    assert!(
        !agent.log_text().contains("drain timeout"),
        "{}",
        agent.log_text()
    );
    let out = idle.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        out.status.success(),
        "closed by the agent, not by timeout(1)"
    );
    let out = upload.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the request in flight finished"
    );
}
