//! Output: a table row, a JSON line, and a CDF plot (SVG) of completion times.

use std::fmt::Write as _;

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: String,
    /// How downloads took pieces (`tree` or `exchange`).
    pub swarm: &'static str,
    /// Nodes.
    pub nodes: usize,
    /// Nodes that completed (survivors).
    pub completed: usize,
    /// Survivors (nodes alive at the end).
    pub survivors: usize,
    /// Completion time percentiles, each node's time as a multiple of its own ideal (the image over its link rate:
    /// a slow node's ideal is longer).
    pub p50: f64,
    /// p99.
    pub p99: f64,
    /// p99.9.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// The ideal, seconds.
    pub ideal_s: f64,
    /// Bytes that entered each zone from outside it (from upstream or from another zone), as multiples of the
    /// image: 1.0 is one crossing per zone.
    pub upstream_bytes_per_zone: Vec<f64>,
    /// Bytes fetched from the upstream registry in all, as multiples of the image.
    pub upstream_total: f64,
    /// Control messages (locates, their answers, announcements) per node per second of the burst.
    pub control_msgs_per_node_s: f64,
    /// Most concurrent uploads at one node.
    pub max_uploads: u32,
    /// Piece requests a node sent to itself (never, if homes hand out only others).
    pub waits_on_self: u64,
    /// Wait cycles found (a node waiting, through the sources it follows, on itself).
    pub wait_cycles: u64,
    /// Simulated seconds.
    pub sim_s: f64,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Completion times of survivors as multiples of their ideal, sorted.
    #[serde(skip)]
    pub times: Vec<f64>,
}

/// The table's header.
pub const HEADER: &str = "| scenario | nodes | completed | p50 | p99 | p99.9 | max | ideal (s) | into each zone (× image) | upstream (× image) | \
                          control msgs/node/s | max uploads at a node | wait cycles | simulated (s) | wall (s) |\n\
                          |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

/// One table row.
pub fn row(r: &Report) -> String {
    let up = r.upstream_bytes_per_zone.iter().map(|u| format!("{u:.3}")).collect::<Vec<_>>().join(" / ");
    format!(
        "| {} | {} | {}/{} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2} | {} | {:.3} | {:.2} | {} | {} | {:.1} | {:.1} |",
        r.scenario,
        r.nodes,
        r.completed,
        r.survivors,
        r.p50,
        r.p99,
        r.p999,
        r.max,
        r.ideal_s,
        up,
        r.upstream_total,
        r.control_msgs_per_node_s,
        r.max_uploads,
        r.wait_cycles,
        r.sim_s,
        r.wall_s
    )
}

/// The CDF of completion times (as multiples of the ideal), one line per report.
pub fn svg(reports: &[Report]) -> String {
    let (w, h, m) = (720.0, 420.0, 50.0);
    let xmax = reports.iter().map(|r| r.max).fold(1.0f64, f64::max).ceil().max(2.0);
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let (x0, y0, x1, y1) = (m, h - m, w - m, m);
    let _ = write!(s, r#"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="black"/>"#);
    let _ = write!(s, r#"<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="black"/>"#);
    for i in 0..=xmax as u32 {
        let x = x0 + (x1 - x0) * f64::from(i) / xmax;
        let _ = write!(s, r#"<text x="{x}" y="{}" text-anchor="middle">{i}×</text>"#, y0 + 16.0);
    }
    for q in [0.0, 0.5, 1.0] {
        let y = y0 - (y0 - y1) * q;
        let _ = write!(s, r#"<text x="{}" y="{y}" text-anchor="end">{q}</text>"#, x0 - 6.0);
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">completion time / ideal (image ÷ the node's link rate)</text>"#,
        (x0 + x1) / 2.0,
        h - 10.0
    );
    let _ = write!(
        s,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})">fraction of nodes done</text>"#,
        h / 2.0,
        h / 2.0
    );
    for (k, r) in reports.iter().enumerate() {
        let c = colors[k % colors.len()];
        let n = r.times.len().max(1) as f64;
        let mut pts = String::new();
        for (i, t) in r.times.iter().enumerate() {
            let x = x0 + (x1 - x0) * (t / xmax).min(1.0);
            let y = y0 - (y0 - y1) * ((i + 1) as f64 / n);
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{pts}"/>"#);
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" fill="{c}">{} ({} nodes)</text>"#,
            x0 + 10.0,
            y1 + 16.0 * (k as f64 + 1.0),
            r.scenario,
            r.nodes
        );
    }
    s.push_str("</svg>\n");
    s
}
