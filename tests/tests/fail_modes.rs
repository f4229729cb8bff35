//! Fail modes: the programs and maps are pinned, so a dead agent's pods get the configured fail
//! mode within a second (refused at once, or direct), a new agent adopts the pins and serves, and
//! `authz-agent cleanup` leaves nothing loaded or attached. Its own test binary, so no other
//! agent runs meanwhile (cargo runs test binaries one after another); an earlier binary's
//! programs may still be on their way out, so it counts only those loaded since it began.
use std::time::{Duration, Instant};

use authz_tests::*;

/// Our programs loaded after `since` (the newest program id when the test began): an earlier
/// test's may still be on their way out.
fn ours(since: u64) -> Vec<String> {
    loaded_bpf_programs()
        .unwrap()
        .into_iter()
        .filter(|(id, n)| *id > since && n.starts_with("authz_"))
        .map(|(_, n)| n)
        .collect()
}

fn newest_program_id() -> u64 {
    let ids = loaded_bpf_programs().unwrap().into_iter().map(|(id, _)| id);
    ids.max().unwrap_or(0)
}

fn attached_to_root() -> String {
    let cg = cgroup2_root();
    let out = sh("bpftool", &["cgroup", "show", cg.to_str().unwrap()]).unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn config(pod: &Host, w: &Host, fail_mode: &str) -> String {
    one_pod_config(pod, w, &format!(", failMode: {fail_mode}"))
}

fn sigkill(agent: &mut Agent) -> Instant {
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    Instant::now()
}

/// Polls until `want` holds for an attempt, for at most `limit` after `since`; every attempt
/// must end within a second (a connect never hangs). Both limits at this machine's `pace`.
fn until(
    pod: &Host,
    url: &str,
    pace: Pace,
    since: Instant,
    limit: Duration,
    want: impl Fn(&Attempt) -> bool,
) -> Attempt {
    let limit = pace.after(limit);
    loop {
        let (a, took) = attempt(pod, url);
        assert!(
            took < pace.after(Duration::from_secs(1)),
            "attempt hung for {took:?}: {a:?} ({pace:?})"
        );
        if want(&a) {
            assert!(
                since.elapsed() < limit,
                "took {:?} to reach {a:?}",
                since.elapsed()
            );
            return a;
        }
        assert!(
            since.elapsed() < limit,
            "still {a:?} after {:?}",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn fail_modes_adoption_and_cleanup() {
    if !require_root() {
        return;
    }
    let since = newest_program_id();
    let mut net = Net::new().unwrap();
    let pod = net.host("p", 2).unwrap();
    let w = net.host("w", 3).unwrap();
    net.serve(&w, "http", 8000).unwrap();
    let url = format!("http://{}:8000/headers", w.ip);
    let pace = Pace::measure(&pod);
    let through_agent = |a: &Agent| {
        let before = a.metric("authz_kernel_connect_redirected_total");
        let (code, body) = curl(&pod, true, &[&url]).unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            json(&body)["client"],
            pod.ip.as_str(),
            "the pod's own source IP"
        );
        assert!(
            a.metric("authz_kernel_connect_redirected_total") > before,
            "went through the agent"
        );
    };

    // Closed (the default): a killed agent's pods are refused at once, never hung.
    let mut a = Agent::start(&config(&pod, &w, "closed")).unwrap();
    a.cleanup_on_drop = false;
    through_agent(&a);
    assert_eq!(
        ours(since).len(),
        6,
        "connect4, connect6, sock_ops, sk_msg, the source check, the pod's sk_lookup: {:?}",
        ours(since)
    );
    // Killed during a load run: from 1 s after the kill every attempt is refused, and no attempt
    // ever hangs (those in flight at the kill end at once with an error).
    let load = Load::start(&pod, &url);
    std::thread::sleep(Duration::from_millis(500) + pace.attempts(2));
    let killed = sigkill(&mut a);
    std::thread::sleep(Duration::from_millis(1500) + pace.attempts(4));
    let log = load.stop();
    assert!(log
        .iter()
        .any(|(at, a, _)| *at < killed && matches!(a, Attempt::Answer(200, _))));
    let after: Vec<_> = log
        .iter()
        .filter(|(at, _, _)| *at > killed + Duration::from_secs(1))
        .collect();
    assert!(after.len() >= 3, "attempts after the kill: {}", after.len());
    for (_, a, took) in &log {
        assert!(
            *took < pace.after(Duration::from_secs(1)),
            "an attempt hung for {took:?}: {a:?} ({pace:?})"
        );
    }
    for (_, a, _) in after {
        assert_eq!(*a, Attempt::Refused, "fail closed within 1 s of the kill");
    }
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        attempt(&pod, &url).0,
        Attempt::Refused,
        "stays closed once the heartbeat is stale"
    );
    assert_eq!(
        ours(since).len(),
        6,
        "still loaded after SIGKILL: {:?}",
        ours(since)
    );
    assert!(attached_to_root().contains("authz_connect4"));

    // A new agent adopts the pins: it serves, and the dead agent's programs are gone.
    let mut b = Agent::start_pinned(&config(&pod, &w, "closed"), &[], &a.bpffs).unwrap();
    assert!(b.log_text().contains("adopted=true"), "{}", b.log_text());
    through_agent(&b);
    assert!(
        b.metric("authz_kernel_connect_refused_total") >= 3.0,
        "the pinned counters kept the refusals made while no agent ran"
    );
    assert_eq!(
        ours(since).len(),
        6,
        "the old programs were replaced, not added to (the pod's sk_lookup adopted): {:?}",
        ours(since)
    );

    // A clean stop keeps failing closed, at once.
    assert!(b.stop().unwrap().success(), "{}", b.log_text());
    let (got, took) = attempt(&pod, &url);
    assert_eq!(got, Attempt::Refused, "closed right after SIGTERM");
    assert!(
        took < pace.after(Duration::from_secs(1)),
        "{took:?} ({pace:?})"
    );

    // Cleanup: nothing loaded, nothing attached, pods go direct.
    b.cleanup().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        ours(since).is_empty(),
        "left loaded after cleanup: {:?}",
        ours(since)
    );
    assert!(
        !attached_to_root().contains("authz_"),
        "{}",
        attached_to_root()
    );
    assert!(!b.bpffs.exists());
    let (code, body) = curl(&pod, true, &[&url]).unwrap();
    assert_eq!(
        (code, json(&body)["client"].clone()),
        (200, pod.ip.as_str().into())
    );
    b.cleanup().unwrap(); // idempotent

    // Open: a killed agent's pods go direct within a second.
    let mut c = Agent::start(&config(&pod, &w, "open")).unwrap();
    through_agent(&c);
    let killed = sigkill(&mut c);
    let got = until(&pod, &url, pace, killed, Duration::from_secs(1), |a| {
        matches!(a, Attempt::Answer(200, _))
    });
    let Attempt::Answer(_, body) = got else {
        unreachable!()
    };
    assert_eq!(
        json(&body)["client"],
        pod.ip.as_str(),
        "direct, from the pod itself"
    );
    drop(c); // cleanup
    std::thread::sleep(Duration::from_millis(300));
    assert!(ours(since).is_empty(), "left loaded: {:?}", ours(since));
}
