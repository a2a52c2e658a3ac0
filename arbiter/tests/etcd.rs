//! rmc-arbiter against a real etcd on loopback (one per test).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use rmc_arbiter::testing::{etcd_available, EtcdServer};
use rmc_arbiter::{Arbiter, ArbiterError, Campaign, Endpoint, LeaseKeeper};

const TIMEOUT: Duration = Duration::from_secs(2);

/// A fresh etcd and a client of it, or None when the test is skipped.
fn setup(test: &str) -> Option<(EtcdServer, Arbiter)> {
    if !etcd_available(test) {
        return None;
    }
    let etcd = EtcdServer::start(&format!("/rmc/{test}")).expect("start etcd");
    let arbiter = Arbiter::new(etcd.endpoint.clone(), TIMEOUT);
    Some((etcd, arbiter))
}

/// Polls `f` every 50 ms until it returns Some, or panics after `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn endpoint_parsing() {
    let e: Endpoint = "etcd://127.0.0.1:2379".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 2379));
    assert_eq!(e.prefix, "/rmc/default");
    assert_eq!(e.to_string(), "etcd://127.0.0.1:2379/rmc/default");
    let e: Endpoint = "etcd://arbiter.example:12379/rmc/vm-7".parse().unwrap();
    assert_eq!(e.prefix, "/rmc/vm-7");
    assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
    for bad in [
        "127.0.0.1:2379",
        "etcd://h",
        "etcd://h:port",
        "etcd://h:1/p/",
    ] {
        let err = bad.parse::<Endpoint>().unwrap_err();
        assert!(
            err.contains("expected etcd://HOST:PORT[/prefix]"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn campaign_won_held_and_won_again_after_revoke() {
    let Some((_etcd, arb)) = setup("campaign_won_held_and_won_again_after_revoke") else {
        return;
    };
    assert_eq!(arb.primary().unwrap(), None);
    let a = arb.grant(Duration::from_secs(10)).unwrap();
    assert_eq!(a.ttl, Duration::from_secs(10));
    let b = arb.grant(Duration::from_millis(1500)).unwrap();
    assert_eq!(
        b.ttl,
        Duration::from_secs(2),
        "TTL rounds up to whole seconds"
    );

    let Campaign::Won { revision: rev_a } = arb.campaign("host-a", a.id, None).unwrap() else {
        panic!("first campaign must win");
    };
    assert_eq!(
        arb.primary().unwrap(),
        Some(("host-a".to_string(), rev_a, a.id))
    );
    assert_eq!(
        arb.campaign("host-b", b.id, None).unwrap(),
        Campaign::Held {
            holder: "host-a".into(),
            revision: rev_a,
            lease: a.id
        }
    );
    // The holder campaigning again is Held too: the key is created once per term.
    assert!(matches!(
        arb.campaign("host-a", a.id, None).unwrap(),
        Campaign::Held { revision, .. } if revision == rev_a
    ));

    arb.revoke(a.id).unwrap();
    assert_eq!(arb.primary().unwrap(), None);
    let Campaign::Won { revision: rev_b } = arb.campaign("host-b", b.id, None).unwrap() else {
        panic!("campaign after revoke must win");
    };
    assert!(rev_b > rev_a, "{rev_b} > {rev_a}");
    assert_eq!(
        arb.primary().unwrap(),
        Some(("host-b".to_string(), rev_b, b.id))
    );

    // Revoked leases: keepalive, timetolive and campaign say expired; revoking again is Ok.
    assert!(matches!(arb.keep_alive(a.id), Err(ArbiterError::LeaseExpired(id)) if id == a.id));
    assert!(matches!(
        arb.time_to_live(a.id),
        Err(ArbiterError::LeaseExpired(_))
    ));
    arb.revoke(a.id).unwrap();
    arb.revoke(0x1234_5678).unwrap();
    // A live lease renews to its TTL.
    assert_eq!(arb.keep_alive(b.id).unwrap(), Duration::from_secs(2));
    assert!(arb.time_to_live(b.id).unwrap() <= Duration::from_secs(2));
    // Campaigning for a free key with a dead lease: LeaseExpired, and nothing written.
    arb.revoke(b.id).unwrap();
    assert_eq!(arb.primary().unwrap(), None);
    assert!(matches!(
        arb.campaign("host-a", a.id, None),
        Err(ArbiterError::LeaseExpired(id)) if id == a.id
    ));
    assert_eq!(arb.primary().unwrap(), None);
}

#[test]
fn expired_lease_frees_the_primary_key() {
    let Some((_etcd, arb)) = setup("expired_lease_frees_the_primary_key") else {
        return;
    };
    let a = arb.grant(Duration::from_secs(1)).unwrap();
    let Campaign::Won { revision: rev_a } = arb.campaign("host-a", a.id, None).unwrap() else {
        panic!("first campaign must win");
    };
    let b = arb.grant(Duration::from_secs(30)).unwrap();
    let start = Instant::now();
    let rev_b = wait_for(Duration::from_secs(4), "the lease to expire", || match arb
        .campaign("host-b", b.id, None)
        .unwrap()
    {
        Campaign::Won { revision } => Some(revision),
        Campaign::Held { holder, .. } => {
            assert_eq!(holder, "host-a");
            None
        }
        other => panic!("unexpected {other:?}"),
    });
    let took = start.elapsed();
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    assert!(rev_b > rev_a);
    assert!(matches!(
        arb.keep_alive(a.id),
        Err(ArbiterError::LeaseExpired(_))
    ));
}

#[test]
fn standby_token_fences_stale_backups() {
    let Some((_etcd, arb)) = setup("standby_token_fences_stale_backups") else {
        return;
    };
    let a = arb.grant(Duration::from_secs(10)).unwrap();
    let b = arb.grant(Duration::from_secs(10)).unwrap();

    // No standby key: a token is required, so the backup is stale.
    assert_eq!(
        arb.campaign("host-b", b.id, Some("epoch-1")).unwrap(),
        Campaign::StaleBackup { current: None }
    );
    assert_eq!(
        arb.primary().unwrap(),
        None,
        "a stale campaign writes nothing"
    );

    let Campaign::Won { revision: rev_a } = arb.campaign("host-a", a.id, None).unwrap() else {
        panic!("must win");
    };
    assert!(arb.mark_standby(rev_a, "epoch-1").unwrap());
    assert_eq!(arb.standby_token().unwrap().as_deref(), Some("epoch-1"));
    assert!(arb.mark_standby(rev_a, "epoch-2").unwrap());
    assert_eq!(arb.standby_token().unwrap().as_deref(), Some("epoch-2"));

    // A non-holder revision can neither mark nor clear.
    assert!(!arb.mark_standby(rev_a + 1000, "forged").unwrap());
    assert!(!arb.clear_standby(rev_a - 1).unwrap());
    assert_eq!(arb.standby_token().unwrap().as_deref(), Some("epoch-2"));

    // The holder dies (lease revoked); the standby key outlives it.
    arb.revoke(a.id).unwrap();
    assert_eq!(arb.standby_token().unwrap().as_deref(), Some("epoch-2"));
    assert_eq!(
        arb.campaign("host-b", b.id, Some("epoch-1")).unwrap(),
        Campaign::StaleBackup {
            current: Some("epoch-2".into())
        }
    );
    assert_eq!(arb.primary().unwrap(), None);
    let Campaign::Won { revision: rev_b } = arb.campaign("host-b", b.id, Some("epoch-2")).unwrap()
    else {
        panic!("the right token must win");
    };
    assert!(rev_b > rev_a);

    // The old primary's revision is fenced off.
    assert!(!arb.mark_standby(rev_a, "epoch-3").unwrap());
    assert!(!arb.clear_standby(rev_a).unwrap());
    assert_eq!(arb.standby_token().unwrap().as_deref(), Some("epoch-2"));
    // The new one clears it.
    assert!(arb.clear_standby(rev_b).unwrap());
    assert_eq!(arb.standby_token().unwrap(), None);
    // With a token and the primary held, Held wins over StaleBackup.
    let c = arb.grant(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        arb.campaign("host-c", c.id, Some("epoch-2")).unwrap(),
        Campaign::Held { revision, .. } if revision == rev_b
    ));
}

#[test]
fn lease_keeper_keeps_the_lease() {
    let Some((_etcd, arb)) = setup("lease_keeper_keeps_the_lease") else {
        return;
    };
    let granted_at = Instant::now();
    let lease = arb.grant(Duration::from_secs(2)).unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(2));
    let keeper = LeaseKeeper::start(
        arb.clone(),
        lease,
        granted_at,
        Duration::from_millis(500),
        Duration::from_millis(500),
    );
    assert_eq!(keeper.lease(), lease.id);
    let gate = keeper.gate();
    let Campaign::Won { revision } = arb.campaign("host-a", lease.id, None).unwrap() else {
        panic!("must win");
    };
    let other = arb.grant(Duration::from_secs(10)).unwrap();

    let start = Instant::now();
    let mut checks = 0;
    while start.elapsed() < Duration::from_secs(5) {
        assert!(keeper.is_valid(), "valid at {:?}", start.elapsed());
        assert!(gate.is_valid());
        assert_eq!(keeper.lost(), None);
        assert!(keeper.valid_until() > Instant::now());
        if checks % 5 == 0 {
            assert!(matches!(
                arb.campaign("host-b", other.id, None).unwrap(),
                Campaign::Held { revision: r, .. } if r == revision
            ));
        }
        checks += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // Renewals moved valid_until well past the grant's.
    assert!(keeper.valid_until() > granted_at + Duration::from_secs(4));
    assert!(keeper.valid_until() <= Instant::now() + Duration::from_millis(1500));

    keeper.resign();
    assert!(!gate.is_valid());
    assert!(gate.lost().unwrap().contains("resigned"));
    assert!(matches!(
        arb.campaign("host-b", other.id, None).unwrap(),
        Campaign::Won { .. }
    ));
}

#[test]
fn lease_keeper_with_frozen_etcd_goes_invalid_before_the_lease_can_expire() {
    let test = "lease_keeper_with_frozen_etcd_goes_invalid_before_the_lease_can_expire";
    if !etcd_available(test) {
        return;
    }
    let etcd = EtcdServer::start("/rmc/frozen").expect("start etcd");
    let arb = Arbiter::new(etcd.endpoint.clone(), Duration::from_millis(400));
    let ttl = Duration::from_secs(2);
    let margin = Duration::from_millis(500);
    let granted_at = Instant::now();
    let lease = arb.grant(ttl).unwrap();
    let keeper = LeaseKeeper::start(
        arb.clone(),
        lease,
        granted_at,
        Duration::from_millis(500),
        margin,
    );
    let gate = keeper.gate();
    assert!(matches!(
        arb.campaign("host-a", lease.id, None).unwrap(),
        Campaign::Won { .. }
    ));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(keeper.is_valid());

    let frozen_at = Instant::now();
    etcd.freeze();
    assert!(etcd.is_frozen());
    std::thread::sleep(Duration::from_millis(100));
    // No renewal can succeed from now on: valid_until is final, and the lease lives at etcd
    // at least until valid_until + margin (etcd counts the TTL from a later instant).
    let until = keeper.valid_until();
    assert!(
        until <= frozen_at + ttl - margin,
        "valid_until is at most one TTL - margin past the freeze"
    );
    let invalid_at = wait_for(ttl, "the keeper to go invalid", || {
        (!gate.is_valid()).then(Instant::now)
    });
    assert!(invalid_at >= until);
    assert!(
        invalid_at < until + margin,
        "invalid {:?} after valid_until",
        invalid_at - until
    );
    assert_eq!(keeper.valid_until(), until, "no renewal while frozen");
    let reason = wait_for(Duration::from_secs(1), "the keeper to report lost", || {
        keeper.lost()
    });
    assert!(
        reason.contains("could not renew the arbiter lease before it could have expired"),
        "{reason}"
    );
    assert!(!keeper.is_valid());

    // Thawed, etcd answers again, but a lost lease stays lost.
    etcd.thaw();
    assert!(!etcd.is_frozen());
    std::thread::sleep(Duration::from_millis(700));
    assert!(!keeper.is_valid());
    assert!(!gate.is_valid());
    assert_eq!(gate.lost(), Some(reason));
    // And etcd expires the lease: another host takes over.
    let other = arb.grant(Duration::from_secs(10)).unwrap();
    wait_for(Duration::from_secs(5), "another host to take over", || {
        matches!(
            arb.campaign("host-b", other.id, None),
            Ok(Campaign::Won { .. })
        )
        .then_some(())
    });
    assert!(matches!(
        arb.keep_alive(lease.id),
        Err(ArbiterError::LeaseExpired(_))
    ));
    drop(keeper);
}

#[test]
fn unreachable_endpoint_fails_quickly() {
    // A closed port: connection refused.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint: Endpoint = format!("etcd://127.0.0.1:{port}/rmc/x").parse().unwrap();
    let arb = Arbiter::new(endpoint, Duration::from_secs(1));
    let start = Instant::now();
    let err = arb.primary().unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(matches!(err, ArbiterError::Unreachable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "Cannot reach the arbiter at etcd://127.0.0.1:{port}/rmc/x: "
        )),
        "{msg}"
    );
    assert!(matches!(
        arb.grant(Duration::from_secs(1)),
        Err(ArbiterError::Unreachable { .. })
    ));

    // A server that accepts but never answers: the whole-request timeout fires.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint: Endpoint = format!("etcd://127.0.0.1:{}", silent.local_addr().unwrap().port())
        .parse()
        .unwrap();
    let arb = Arbiter::new(endpoint, Duration::from_millis(300));
    for call in 0..2 {
        let start = Instant::now();
        let err = if call == 0 {
            arb.campaign("me", 1, None).unwrap_err()
        } else {
            arb.keep_alive(1).unwrap_err()
        };
        let took = start.elapsed();
        assert!(matches!(err, ArbiterError::Unreachable { .. }), "{err:?}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(1),
            "took {took:?}"
        );
    }
}

/// A VM that starts afresh may not go live over a standby that holds the VM's current state:
/// `campaign_fresh` needs both keys absent, and says which standby holds the state.
#[test]
fn a_fresh_vm_does_not_go_live_over_a_standby_record() {
    let Some((_etcd, arb)) = setup("a_fresh_vm_does_not_go_live_over_a_standby_record") else {
        return;
    };
    let a = arb.grant(Duration::from_secs(10)).unwrap();
    let Campaign::Won { revision: rev_a } = arb.campaign_fresh("host-a", a.id).unwrap() else {
        panic!("nothing recorded yet: a fresh VM goes live");
    };
    assert!(arb.mark_standby(rev_a, "session-1").unwrap());
    // The primary dies; its standby's record stays.
    arb.revoke(a.id).unwrap();
    let b = arb.grant(Duration::from_secs(10)).unwrap();
    assert_eq!(
        arb.campaign_fresh("host-b", b.id).unwrap(),
        Campaign::StaleBackup {
            current: Some("session-1".into())
        }
    );
    assert_eq!(
        arb.primary().unwrap(),
        None,
        "a refused campaign writes nothing"
    );
    // A live holder is reported as such.
    let Campaign::Won { revision: rev_s } =
        arb.campaign("standby", b.id, Some("session-1")).unwrap()
    else {
        panic!("the standby with the recorded session wins");
    };
    let c = arb.grant(Duration::from_secs(10)).unwrap();
    assert!(matches!(
        arb.campaign_fresh("host-c", c.id).unwrap(),
        Campaign::Held { revision, .. } if revision == rev_s
    ));
    // Once the record is cleared (a VM given up on purpose) and the holder gone, a fresh VM
    // may go live.
    assert!(arb.clear_standby(rev_s).unwrap());
    arb.revoke(b.id).unwrap();
    assert!(matches!(
        arb.campaign_fresh("host-c", c.id).unwrap(),
        Campaign::Won { .. }
    ));
}
