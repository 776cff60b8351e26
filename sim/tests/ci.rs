//! The CI scenario: 200 nodes in 2 zones, a home killed mid-burst. Invariants, not times.

use shoal_sim::scenarios::scenario;
use shoal_sim::sim::Sim;

#[test]
fn a_200_node_burst_completes_with_one_upstream_fetch_per_zone_and_no_wait_cycles() {
    let p = scenario("ci-200").expect("built in");
    let r = Sim::new(p.clone()).run();
    assert_eq!(r.survivors, 198, "two of 200 die (1 %, one of them a home)");
    assert_eq!(r.completed, r.survivors, "every survivor completes: {r:?}");
    for (z, into) in r.upstream_bytes_per_zone.iter().enumerate() {
        // One crossing per zone; a killed home's unfinished download is resumed from what its followers hold,
        // so at most that one layer's remainder crosses again.
        assert!((0.999..=1.5).contains(into), "{into}× the image entered zone {z}");
    }
    assert!(r.upstream_total <= 1.5, "{}× the image came from upstream", r.upstream_total);
    assert_eq!(r.wait_cycles, 0, "no node waits on itself through the holders it follows");
    assert_eq!(r.waits_on_self, 0);
    // Deterministic by seed.
    let again = Sim::new(p).run();
    assert_eq!(again.times, r.times);
}

#[test]
fn without_faults_each_zone_fetches_the_image_exactly_once() {
    let mut p = scenario("ci-200").expect("built in");
    p.deaths = 0.0;
    p.kill_homes = 0;
    let r = Sim::new(p).run();
    assert_eq!(r.completed, 200);
    for into in &r.upstream_bytes_per_zone {
        assert!((0.999..=1.02).contains(into), "{into}× the image entered a zone");
    }
    assert!((0.999..=1.02).contains(&r.upstream_total), "{}× the image came from upstream", r.upstream_total);
}
