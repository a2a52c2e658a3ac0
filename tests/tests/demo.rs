//! `rmc demo` (KVM): primaries SIGKILLed at random moments under checking clients stay
//! consistent; and its checker shown to catch a broken guarantee: with output released before
//! its checkpoint is acknowledged (a fault injected on purpose), a failover must be reported
//! as INCONSISTENT. A checker never seen to fail would be no evidence.

use std::process::Command;
use std::time::Duration;

use rmc::checker::Inconsistency;
use rmc::events::Event;
use rmc_tests::{events_in, kvm_available, output_within, rmc_bin};

/// Heartbeats for a busy 2-core machine (a SIGKILLed primary is seen at once anyway, through
/// its closed connection).
const HEARTBEAT: [&str; 4] = ["--heartbeat-ms", "100", "--heartbeat-misses", "30"];

#[test]
fn failover_trials_stay_consistent() {
    if !kvm_available("failover_trials_stay_consistent") {
        return;
    }
    // 20 trials, each killing the primary at a different moment under continuous load from
    // three clients checked together.
    let out = output_within(
        Command::new(rmc_bin())
            .args([
                "--json",
                "demo",
                "--trials",
                "20",
                "--memory",
                "64M",
                "--clients",
                "3",
            ])
            .args(["--kill-after", "0.8", "--after", "0.4"])
            .args(HEARTBEAT),
        Duration::from_secs(900),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Event> = events_in(&stdout);
    // Every trial was killed and stayed consistent (an inconsistent one ends the demo with
    // `demo_trial_failed` instead), each with three clients.
    let trials: Vec<(u32, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::DemoTrial { trial, clients, .. } => Some((*trial, *clients)),
            _ => None,
        })
        .collect();
    assert_eq!(
        trials,
        (1..=20).map(|t| (t, 3)).collect::<Vec<_>>(),
        "{stdout}"
    );
    assert!(
        events.contains(&Event::DemoStarted { trials: 20 }),
        "{stdout}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::DemoSummary { trials: 20, .. })),
        "{stdout}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::DemoStandby(_))),
        "{stdout}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::DemoTrialFailed { .. })),
        "{stdout}"
    );
}

#[test]
fn demo_reports_output_released_before_its_ack() {
    if !kvm_available("demo_reports_output_released_before_its_ack") {
        return;
    }
    // A kill can land where no released reply is missing from the standby's checkpoint (the
    // primary paused for a checkpoint that then reaches the standby whole): that trial is
    // rightly consistent. So up to five trials, each killing at another moment; the demo
    // stops at the first contradiction, and with output released early one must come.
    for clients in ["1", "3"] {
        let out = output_within(
            Command::new(rmc_bin())
                .args([
                    "--json",
                    "demo",
                    "--trials",
                    "5",
                    "--memory",
                    "64M",
                    "--kill-after",
                    "1",
                    "--after",
                    "0.5",
                    "--clients",
                    clients,
                    "--inject-fault",
                    "release-before-ack",
                ])
                .args(HEARTBEAT),
            Duration::from_secs(300),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{stdout}");
        assert!(
            !out.status.success(),
            "{clients} client(s): the broken guarantee went unnoticed:\n{stdout}{stderr}"
        );
        let events: Vec<Event> = events_in(&stdout);
        // The service went back in time: a request sent after a reply with counter c got a
        // counter <= c (the released reply's state was lost with the primary).
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::DemoTrialFailed {
                    inconsistency: Some(Inconsistency::BehindSeen { .. }),
                    ..
                }
            )),
            "{clients} client(s): not reported as a contradiction:\n{stdout}{stderr}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::DemoSummary { .. })),
            "{stdout}"
        );
    }
}
