//! A picture of the mesh: nodes, the pods and endpoints in them, the
//! services, and the connections between pods and endpoints with their
//! service chains, rendered as SVG (or Graphviz DOT).
//!
//! The [`Model`] is plain data that any caller can fill (`nsmctl graph`
//! fills it from a manager's gRPC API, a testbed from its topology), and
//! [`render_svg`] / [`render_dot`] are pure functions of it: no I/O, no
//! clock, no randomness, so equal models give byte-equal pictures.
//!
//! Layout, chosen so that a person reads it at a glance and no two boxes
//! overlap:
//! - each node is a band across the picture, one under the other, in name
//!   order; its pods (clients) sit in the band's left column, its endpoints
//!   in the right column;
//! - each connection is a box in the middle lane naming its service, its
//!   addresses and its state, with its chain functions as small boxes in
//!   order inside it; edges run from the pod to the connection box and on
//!   to the endpoint, coloured by service;
//! - the services are listed at the top in their colours.
//!
//! Every string is escaped, and every node, pod, endpoint and connection
//! carries a visible label and a `<title>` (shown as a tooltip).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Everything the picture shows. Names are the keys that tie the parts
/// together: a pod or endpoint names its node, a connection its pod and
/// endpoint, a chain its connection. Parts that name something missing are
/// still drawn (a missing node is made up, an edge to a missing box is left
/// out), so a partial view renders too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// A caption at the top (e.g. which manager the view is from).
    pub title: String,
    /// The nodes (one manager and forwarder each).
    pub nodes: Vec<Node>,
    /// Client pods (or any network namespace holding a connection).
    pub pods: Vec<Pod>,
    /// Network service endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Network services.
    pub services: Vec<Service>,
    /// Connections, from a pod to an endpoint.
    pub connections: Vec<Connection>,
    /// Service chains of connections.
    pub chains: Vec<Chain>,
}

/// A node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Node name, unique.
    pub name: String,
    /// A second line under the name, e.g. the forwarder's underlay
    /// address; empty for none.
    pub detail: String,
}

/// A client pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// Pod name, unique among pods.
    pub name: String,
    /// The node it runs on.
    pub node: String,
}

/// A network service endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint name, unique among endpoints.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// The services it serves.
    pub services: Vec<String>,
}

/// A network service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// `IP` or `ETHERNET`; empty for unknown.
    pub payload: String,
}

/// A connection from a pod to an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connection {
    /// Connection id.
    pub id: String,
    /// Network service.
    pub service: String,
    /// The client pod's name.
    pub pod: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// The client's addresses, e.g. `172.31.0.1/32`.
    pub src: Vec<String>,
    /// The endpoint's addresses.
    pub dst: Vec<String>,
    /// `UP`, `DOWN`, ...
    pub state: String,
}

/// The service chain of one connection (on one forwarder).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The connection it belongs to.
    pub connection: String,
    /// The functions in order, each a short label (e.g. `acl`, or
    /// `acl denied=3`).
    pub functions: Vec<String>,
}

// Geometry, in SVG user units (px). Text is monospace so that widths can
// be computed without font metrics.
const FONT: f64 = 12.0;
const CHAR_W: f64 = 7.3;
const LINE: f64 = 16.0;
const MARGIN: f64 = 20.0;
const PAD: f64 = 12.0;
const BOX_H: f64 = 38.0;
const GAP: f64 = 14.0;
const LANE_GAP: f64 = 60.0;
const NODE_HEAD: f64 = 40.0;
const CHIP_H: f64 = 18.0;
const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

/// Escapes text for XML character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn text_w(s: &str) -> f64 {
    f64::from(u32::try_from(s.chars().count()).unwrap_or(u32::MAX)) * CHAR_W
}

/// Ids up to 24 characters whole, longer ones (UUIDs) as their first 8
/// and an ellipsis; the whole id is in the connection's `<title>`.
fn short_id(id: &str) -> String {
    if id.chars().count() <= 24 {
        return id.to_string();
    }
    let head: String = id.chars().take(8).collect();
    format!("{head}\u{2026}")
}

/// One connection's box content.
struct ConnBox<'a> {
    conn: &'a Connection,
    head: String,
    addrs: String,
    chain: Vec<&'a str>,
    w: f64,
    h: f64,
}

impl<'a> ConnBox<'a> {
    fn new(conn: &'a Connection, chain: Vec<&'a str>) -> Self {
        let head = format!("{} [{}] {}", conn.service, conn.state, short_id(&conn.id));
        let addrs = if conn.src.is_empty() && conn.dst.is_empty() {
            "(no addresses)".to_string()
        } else {
            format!("{} -> {}", conn.src.join(","), conn.dst.join(","))
        };
        let chips: f64 = chain.iter().map(|f| text_w(f) + 12.0).sum::<f64>()
            + 16.0 * f64::from(u32::try_from(chain.len()).unwrap_or(0));
        let w = text_w(&head).max(text_w(&addrs)).max(chips) + 2.0 * PAD;
        let h = if chain.is_empty() {
            2.0 * LINE + PAD
        } else {
            2.0 * LINE + CHIP_H + 1.5 * PAD
        };
        ConnBox {
            conn,
            head,
            addrs,
            chain,
            w,
            h,
        }
    }
}

/// A placed box: left, top, width, height.
#[derive(Debug, Clone, Copy)]
struct Rect {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

impl Rect {
    fn mid_y(&self) -> f64 {
        self.y + self.h / 2.0
    }
    fn right(&self) -> f64 {
        self.x + self.w
    }
}

/// Nodes in name order, with the made-up ones that pods or endpoints name
/// but the model lacks.
fn all_nodes(m: &Model) -> Vec<Node> {
    let mut nodes: BTreeMap<&str, &str> = BTreeMap::new();
    for n in &m.nodes {
        nodes.insert(&n.name, &n.detail);
    }
    for name in m
        .pods
        .iter()
        .map(|p| p.node.as_str())
        .chain(m.endpoints.iter().map(|e| e.node.as_str()))
    {
        nodes.entry(name).or_insert("");
    }
    nodes
        .into_iter()
        .map(|(name, detail)| Node {
            name: name.to_string(),
            detail: detail.to_string(),
        })
        .collect()
}

/// Colour of each service, in name order over the services the model
/// lists or a connection names.
fn colours(m: &Model) -> BTreeMap<&str, &'static str> {
    let mut names: Vec<&str> = m
        .services
        .iter()
        .map(|s| s.name.as_str())
        .chain(m.connections.iter().map(|c| c.service.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, PALETTE[i % PALETTE.len()]))
        .collect()
}

fn text(out: &mut String, x: f64, y: f64, class: &str, s: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" class="{class}">{}</text>"#,
        escape(s)
    );
}

/// Renders the model as a standalone SVG document (UTF-8, no external
/// resources). Deterministic: parts are sorted by name (connections by
/// pod, endpoint and id), whatever the order of the model's vectors.
pub fn render_svg(m: &Model) -> String {
    let nodes = all_nodes(m);
    let colour = colours(m);
    let mut pods: Vec<&Pod> = m.pods.iter().collect();
    pods.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));
    let mut endpoints: Vec<&Endpoint> = m.endpoints.iter().collect();
    endpoints.sort_by(|a, b| (&a.node, &a.name).cmp(&(&b.node, &b.name)));

    // Column widths. The pods' column is at least as wide as the node
    // headers above it, so that connection boxes never cover a header.
    let node_head_w = nodes
        .iter()
        .map(|n| text_w(&format!("node {}", n.name)).max(text_w(&n.detail)))
        .fold(0.0_f64, f64::max);
    let pod_w = pods
        .iter()
        .map(|p| text_w(&p.name) + 2.0 * PAD)
        .fold(120.0_f64.max(node_head_w), f64::max);
    let ep_label = |e: &Endpoint| format!("serves {}", e.services.join(","));
    let ep_w = endpoints
        .iter()
        .map(|e| (text_w(&e.name).max(text_w(&ep_label(e)))) + 2.0 * PAD)
        .fold(120.0_f64, f64::max);
    let mut conns: Vec<ConnBox<'_>> = m
        .connections
        .iter()
        .map(|c| {
            let chain: Vec<&str> = m
                .chains
                .iter()
                .filter(|ch| ch.connection == c.id)
                .flat_map(|ch| ch.functions.iter().map(String::as_str))
                .collect();
            ConnBox::new(c, chain)
        })
        .collect();
    let lane_w = conns.iter().map(|c| c.w).fold(160.0_f64, f64::max);
    let pod_x = MARGIN + PAD;
    let lane_x = pod_x + pod_w + LANE_GAP;
    let ep_x = lane_x + lane_w + LANE_GAP;
    let width = (ep_x + ep_w + PAD + MARGIN).max(MARGIN * 2.0 + text_w(&m.title) * 14.0 / FONT);

    // Services legend.
    let title_h = if m.title.is_empty() { 0.0 } else { LINE + 6.0 };
    let legend_y = MARGIN + title_h;
    let mut y = legend_y + LINE + GAP;

    // Node bands.
    let mut bands: Vec<(Node, Rect)> = Vec::new();
    let mut pod_box: BTreeMap<&str, Rect> = BTreeMap::new();
    let mut ep_box: BTreeMap<&str, Rect> = BTreeMap::new();
    for n in &nodes {
        let top = y;
        let inner = top + NODE_HEAD;
        let mut py = inner;
        for p in pods.iter().filter(|p| p.node == n.name) {
            pod_box.insert(
                &p.name,
                Rect {
                    x: pod_x,
                    y: py,
                    w: pod_w,
                    h: BOX_H,
                },
            );
            py += BOX_H + GAP;
        }
        let mut ey = inner;
        for e in endpoints.iter().filter(|e| e.node == n.name) {
            ep_box.insert(
                &e.name,
                Rect {
                    x: ep_x,
                    y: ey,
                    w: ep_w,
                    h: BOX_H,
                },
            );
            ey += BOX_H + GAP;
        }
        let bottom = py.max(ey).max(inner + BOX_H + GAP);
        bands.push((
            n.clone(),
            Rect {
                x: MARGIN,
                y: top,
                w: width - 2.0 * MARGIN,
                h: bottom - top,
            },
        ));
        y = bottom + GAP;
    }

    // Connection boxes: each wants to sit level with the middle of its two
    // ends; they are taken in that order and pushed down so none overlap.
    let want = |c: &ConnBox<'_>| {
        let a = pod_box.get(c.conn.pod.as_str()).map(Rect::mid_y);
        let b = ep_box.get(c.conn.endpoint.as_str()).map(Rect::mid_y);
        let mid = match (a, b) {
            (Some(a), Some(b)) => (a + b) / 2.0,
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => legend_y + LINE + GAP + NODE_HEAD,
        };
        mid - c.h / 2.0
    };
    conns.sort_by(|a, b| {
        want(a)
            .total_cmp(&want(b))
            .then_with(|| a.conn.pod.cmp(&b.conn.pod))
            .then_with(|| a.conn.endpoint.cmp(&b.conn.endpoint))
            .then_with(|| a.conn.id.cmp(&b.conn.id))
    });
    let mut placed: Vec<Rect> = Vec::new();
    let mut floor = legend_y + LINE + GAP + NODE_HEAD;
    for c in &conns {
        let top = want(c).max(floor);
        placed.push(Rect {
            x: lane_x + (lane_w - c.w) / 2.0,
            y: top,
            w: c.w,
            h: c.h,
        });
        floor = top + c.h + GAP;
    }
    // Bands grow to hold the connection boxes that fall below them all.
    let height = (y.max(floor) + MARGIN).ceil();
    if let Some((_, last)) = bands.last_mut() {
        let bottom = floor.max(last.y + last.h);
        last.h = bottom - last.y;
    }

    let mut out = String::new();
    let _ = writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}" font-family="monospace" font-size="{FONT}">"#,
        w = width.ceil(),
        h = height
    );
    let _ = writeln!(
        out,
        "<title>{}</title>",
        escape(if m.title.is_empty() {
            "nsm-rs mesh"
        } else {
            &m.title
        })
    );
    out.push_str(concat!(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" ",
        "markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\">",
        "<path d=\"M0,0 L10,5 L0,10 z\" fill=\"#444\"/></marker>\n",
        "<style>.node{fill:#f4f6f8;stroke:#6b7785;stroke-width:1.5}",
        ".pod{fill:#ffffff;stroke:#33475b;stroke-width:1.2}",
        ".nse{fill:#fff7e0;stroke:#9a6b00;stroke-width:1.2}",
        ".conn{fill:#ffffff;stroke-width:1.5}",
        ".chip{fill:#eef3ff;stroke:#5470c6}",
        ".b{font-weight:bold}.d{fill:#555}.t{font-weight:bold;font-size:14px}",
        ".edge{fill:none;stroke-width:2}</style></defs>\n",
    ));
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{:.0}" height="{height:.0}" fill="white"/>"#,
        width.ceil()
    );
    if !m.title.is_empty() {
        text(&mut out, MARGIN, MARGIN + FONT, "t", &m.title);
    }

    // Services legend.
    let mut lx = MARGIN;
    text(&mut out, lx, legend_y + FONT, "b", "services:");
    lx += text_w("services: ") + 4.0;
    let mut services: Vec<&Service> = m.services.iter().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    for s in services {
        let c = colour.get(s.name.as_str()).copied().unwrap_or("#000");
        let label = if s.payload.is_empty() {
            s.name.clone()
        } else {
            format!("{} ({})", s.name, s.payload)
        };
        let _ = writeln!(
            out,
            r#"<g class="service"><title>service {}</title><rect x="{lx:.1}" y="{:.1}" width="14" height="10" fill="{c}"/>"#,
            escape(&s.name),
            legend_y + 2.0
        );
        text(&mut out, lx + 18.0, legend_y + FONT, "s", &label);
        out.push_str("</g>\n");
        lx += 18.0 + text_w(&label) + 16.0;
    }

    for (n, r) in &bands {
        let _ = writeln!(
            out,
            r#"<g class="node-group"><title>node {}</title><rect class="node" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="8"/>"#,
            escape(&n.name),
            r.x,
            r.y,
            r.w,
            r.h
        );
        text(
            &mut out,
            r.x + PAD,
            r.y + FONT + 6.0,
            "b",
            &format!("node {}", n.name),
        );
        if !n.detail.is_empty() {
            text(&mut out, r.x + PAD, r.y + FONT + 6.0 + LINE, "d", &n.detail);
        }
        out.push_str("</g>\n");
    }
    for p in &pods {
        let r = pod_box[p.name.as_str()];
        let _ = writeln!(
            out,
            r#"<g class="pod-group"><title>pod {} on {}</title><rect class="pod" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="5"/>"#,
            escape(&p.name),
            escape(&p.node),
            r.x,
            r.y,
            r.w,
            r.h
        );
        text(&mut out, r.x + PAD, r.y + FONT + 6.0, "b", &p.name);
        text(
            &mut out,
            r.x + PAD,
            r.y + FONT + 6.0 + LINE - 2.0,
            "d",
            "pod",
        );
        out.push_str("</g>\n");
    }
    for e in &endpoints {
        let r = ep_box[e.name.as_str()];
        let _ = writeln!(
            out,
            r#"<g class="endpoint-group"><title>endpoint {} on {}</title><rect class="nse" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="5"/>"#,
            escape(&e.name),
            escape(&e.node),
            r.x,
            r.y,
            r.w,
            r.h
        );
        text(&mut out, r.x + PAD, r.y + FONT + 6.0, "b", &e.name);
        text(
            &mut out,
            r.x + PAD,
            r.y + FONT + 6.0 + LINE - 2.0,
            "d",
            &ep_label(e),
        );
        out.push_str("</g>\n");
    }

    for (c, r) in conns.iter().zip(&placed) {
        let col = colour
            .get(c.conn.service.as_str())
            .copied()
            .unwrap_or("#000");
        let _ = writeln!(
            out,
            r#"<g class="connection"><title>connection {} ({}) {} -&gt; {}</title>"#,
            escape(&c.conn.id),
            escape(&c.conn.service),
            escape(&c.conn.pod),
            escape(&c.conn.endpoint)
        );
        let dash = if c.conn.state == "UP" || c.conn.state.is_empty() {
            ""
        } else {
            r#" stroke-dasharray="6 4""#
        };
        if let Some(a) = pod_box.get(c.conn.pod.as_str()) {
            let (x1, y1, x2, y2) = (a.right(), a.mid_y(), r.x, r.mid_y());
            let mx = (x1 + x2) / 2.0;
            let _ = writeln!(
                out,
                r#"<path class="edge" stroke="{col}"{dash} d="M{x1:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {x2:.1},{y2:.1}"/>"#
            );
        }
        if let Some(b) = ep_box.get(c.conn.endpoint.as_str()) {
            let (x1, y1, x2, y2) = (r.right(), r.mid_y(), b.x, b.mid_y());
            let mx = (x1 + x2) / 2.0;
            let _ = writeln!(
                out,
                r#"<path class="edge" stroke="{col}"{dash} marker-end="url(#arrow)" d="M{x1:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {x2:.1},{y2:.1}"/>"#
            );
        }
        let _ = writeln!(
            out,
            r#"<rect class="conn" stroke="{col}"{dash} x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="4"/>"#,
            r.x, r.y, r.w, r.h
        );
        text(&mut out, r.x + PAD, r.y + FONT + 4.0, "b", &c.head);
        text(&mut out, r.x + PAD, r.y + FONT + 4.0 + LINE, "d", &c.addrs);
        let mut cx = r.x + PAD;
        let cy = r.y + 2.0 * LINE + PAD / 2.0;
        for (i, f) in c.chain.iter().enumerate() {
            if i > 0 {
                let _ = writeln!(
                    out,
                    r##"<path class="edge" stroke="#5470c6" stroke-width="1" marker-end="url(#arrow)" d="M{:.1},{:.1} L{:.1},{:.1}"/>"##,
                    cx - 15.0,
                    cy + CHIP_H / 2.0,
                    cx - 1.0,
                    cy + CHIP_H / 2.0
                );
            }
            let w = text_w(f) + 12.0;
            let _ = writeln!(
                out,
                r#"<g class="function"><title>chain function {} of {}: {}</title><rect class="chip" x="{cx:.1}" y="{cy:.1}" width="{w:.1}" height="{CHIP_H}" rx="3"/>"#,
                i + 1,
                escape(&c.conn.id),
                escape(f)
            );
            text(&mut out, cx + 6.0, cy + CHIP_H - 5.0, "f", f);
            out.push_str("</g>\n");
            cx += w + 16.0;
        }
        out.push_str("</g>\n");
    }
    out.push_str("</svg>\n");
    out
}

/// Escapes a Graphviz double-quoted string.
fn dot_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders the model as a Graphviz `digraph`: a cluster per node, a box
/// per pod and endpoint, a labelled edge per connection (chain functions
/// in the label, in order). Deterministic, like [`render_svg`].
pub fn render_dot(m: &Model) -> String {
    let nodes = all_nodes(m);
    let colour = colours(m);
    let mut out = String::from(
        "digraph mesh {\n  rankdir=LR;\n  node [shape=box, fontname=monospace];\n  edge [fontname=monospace];\n",
    );
    if !m.title.is_empty() {
        let _ = writeln!(out, "  label={};\n  labelloc=t;", dot_str(&m.title));
    }
    let mut pods: Vec<&Pod> = m.pods.iter().collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let mut endpoints: Vec<&Endpoint> = m.endpoints.iter().collect();
    endpoints.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, n) in nodes.iter().enumerate() {
        let label = if n.detail.is_empty() {
            format!("node {}", n.name)
        } else {
            format!("node {}\n{}", n.name, n.detail)
        };
        let _ = writeln!(
            out,
            "  subgraph cluster_{i} {{\n    label={};",
            dot_str(&label)
        );
        for p in pods.iter().filter(|p| p.node == n.name) {
            let _ = writeln!(
                out,
                "    {} [label={}];",
                dot_str(&format!("pod/{}", p.name)),
                dot_str(&format!("pod {}", p.name))
            );
        }
        for e in endpoints.iter().filter(|e| e.node == n.name) {
            let _ = writeln!(
                out,
                "    {} [label={}, style=filled, fillcolor=\"#fff7e0\"];",
                dot_str(&format!("nse/{}", e.name)),
                dot_str(&format!(
                    "endpoint {}\nserves {}",
                    e.name,
                    e.services.join(",")
                ))
            );
        }
        out.push_str("  }\n");
    }
    let mut conns: Vec<&Connection> = m.connections.iter().collect();
    conns.sort_by(|a, b| (&a.pod, &a.endpoint, &a.id).cmp(&(&b.pod, &b.endpoint, &b.id)));
    for c in conns {
        let chain: Vec<&str> = m
            .chains
            .iter()
            .filter(|ch| ch.connection == c.id)
            .flat_map(|ch| ch.functions.iter().map(String::as_str))
            .collect();
        let mut label = format!(
            "{} [{}] {}\n{} -> {}",
            c.service,
            c.state,
            short_id(&c.id),
            c.src.join(","),
            c.dst.join(",")
        );
        if !chain.is_empty() {
            let _ = write!(label, "\nchain: {}", chain.join(" > "));
        }
        let style = if c.state == "UP" || c.state.is_empty() {
            "solid"
        } else {
            "dashed"
        };
        let _ = writeln!(
            out,
            "  {} -> {} [label={}, color=\"{}\", style={style}];",
            dot_str(&format!("pod/{}", c.pod)),
            dot_str(&format!("nse/{}", c.endpoint)),
            dot_str(&label),
            colour.get(c.service.as_str()).copied().unwrap_or("#000")
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        Model {
            title: "mesh seen from node-1".into(),
            nodes: vec![
                Node {
                    name: "node-2".into(),
                    detail: "198.51.100.2:51820".into(),
                },
                Node {
                    name: "node-1".into(),
                    detail: "198.51.100.1:51820".into(),
                },
            ],
            pods: vec![
                Pod {
                    name: "web".into(),
                    node: "node-1".into(),
                },
                Pod {
                    name: "a<b>&\"c'".into(),
                    node: "node-1".into(),
                },
            ],
            endpoints: vec![
                Endpoint {
                    name: "echo".into(),
                    node: "node-2".into(),
                    services: vec!["secure-net".into()],
                },
                Endpoint {
                    name: "local".into(),
                    node: "node-1".into(),
                    services: vec!["local-net".into()],
                },
                Endpoint {
                    name: "far".into(),
                    node: "node-3".into(),
                    services: vec!["secure-net".into()],
                },
            ],
            services: vec![
                Service {
                    name: "secure-net".into(),
                    payload: "IP".into(),
                },
                Service {
                    name: "local-net".into(),
                    payload: "IP".into(),
                },
            ],
            connections: vec![
                Connection {
                    id: "conn-web-1".into(),
                    service: "secure-net".into(),
                    pod: "web".into(),
                    endpoint: "echo".into(),
                    src: vec!["172.31.0.1/32".into()],
                    dst: vec!["172.31.0.2/32".into()],
                    state: "UP".into(),
                },
                Connection {
                    id: "conn-web-2".into(),
                    service: "local-net".into(),
                    pod: "web".into(),
                    endpoint: "local".into(),
                    src: vec!["172.30.0.1/32".into()],
                    dst: vec!["172.30.0.2/32".into()],
                    state: "DOWN".into(),
                },
                Connection {
                    id: "conn-odd".into(),
                    service: "secure-net".into(),
                    pod: "a<b>&\"c'".into(),
                    endpoint: "echo".into(),
                    src: vec![],
                    dst: vec![],
                    state: "UP".into(),
                },
            ],
            chains: vec![Chain {
                connection: "conn-web-1".into(),
                functions: vec!["acl allowed=3".into(), "ratelimit".into(), "counter".into()],
            }],
        }
    }

    /// Every visible text of the document, unescaped by the parser.
    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn svg_is_well_formed_and_labels_everything() {
        let m = sample();
        let svg = render_svg(&m);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert_eq!(
            doc.root_element().tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        let t = texts(&doc);
        let has = |s: &str| t.iter().any(|x| x.contains(s));
        for n in ["node-1", "node-2", "node-3"] {
            assert!(has(&format!("node {n}")), "{n} labelled: {t:?}");
        }
        for p in &m.pods {
            assert!(t.contains(&p.name), "pod {} labelled: {t:?}", p.name);
        }
        for e in &m.endpoints {
            assert!(t.contains(&e.name), "endpoint {} labelled", e.name);
        }
        for c in &m.connections {
            assert!(has(&c.service), "{}", c.service);
            assert!(has(&short_id(&c.id)), "{}", c.id);
            for a in c.src.iter().chain(&c.dst) {
                assert!(has(a), "{a}");
            }
        }
        for f in ["acl allowed=3", "ratelimit", "counter"] {
            assert!(t.contains(&f.to_string()), "{f}");
        }
        assert!(has("198.51.100.2:51820"));
        assert!(has("secure-net (IP)") && has("local-net (IP)"));
        // One group per connection and per function, each with a title.
        let groups = |class: &str| {
            doc.descendants()
                .filter(|n| n.attribute("class") == Some(class))
                .count()
        };
        assert_eq!(groups("connection"), 3);
        assert_eq!(groups("function"), 3);
        assert_eq!(groups("pod-group"), 2);
        assert_eq!(groups("endpoint-group"), 3);
        assert_eq!(groups("node-group"), 3);
        // Pod to box, box to endpoint: two edges per connection, plus the
        // arrows between chain functions.
        assert_eq!(groups("edge"), 3 * 2 + 2);
    }

    #[test]
    fn svg_escapes_text() {
        let svg = render_svg(&sample());
        assert!(svg.contains("a&lt;b&gt;&amp;&quot;c&apos;"));
        assert!(!svg.contains("a<b>"));
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert!(texts(&doc).contains(&"a<b>&\"c'".to_string()));
        assert_eq!(escape("x\u{1}y"), "x\u{fffd}y");
    }

    #[test]
    fn svg_is_deterministic_whatever_the_input_order() {
        let m = sample();
        let mut r = m.clone();
        r.nodes.reverse();
        r.pods.reverse();
        r.endpoints.reverse();
        r.services.reverse();
        r.connections.reverse();
        assert_eq!(render_svg(&m), render_svg(&r));
        assert_eq!(render_dot(&m), render_dot(&r));
    }

    #[test]
    fn boxes_do_not_overlap() {
        let svg = render_svg(&sample());
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let rects: Vec<(f64, f64, f64, f64)> = doc
            .descendants()
            .filter(|n| {
                n.has_tag_name("rect")
                    && matches!(n.attribute("class"), Some("pod" | "nse" | "conn"))
            })
            .map(|n| {
                let f = |a: &str| n.attribute(a).unwrap().parse::<f64>().unwrap();
                (f("x"), f("y"), f("width"), f("height"))
            })
            .collect();
        assert_eq!(rects.len(), 2 + 3 + 3);
        for (i, a) in rects.iter().enumerate() {
            for b in &rects[i + 1..] {
                let apart =
                    a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
                assert!(apart, "{a:?} overlaps {b:?}");
            }
        }
        // Everything fits in the picture.
        let root = doc.root_element();
        let w: f64 = root.attribute("width").unwrap().parse().unwrap();
        let h: f64 = root.attribute("height").unwrap().parse().unwrap();
        for r in &rects {
            assert!(r.0 + r.2 <= w && r.1 + r.3 <= h, "{r:?} outside {w}x{h}");
        }
    }

    #[test]
    fn empty_model_renders() {
        let svg = render_svg(&Model::default());
        roxmltree::Document::parse(&svg).unwrap();
        assert!(render_dot(&Model::default()).starts_with("digraph mesh {"));
    }

    #[test]
    fn dot_names_everything_and_escapes() {
        let dot = render_dot(&sample());
        for s in [
            "cluster_0",
            "node node-1",
            "pod web",
            "endpoint echo",
            "\"pod/web\" -> \"nse/echo\"",
            "chain: acl allowed=3 > ratelimit > counter",
            "style=dashed",
            "a<b>&\\\"c'",
        ] {
            assert!(dot.contains(s), "{s} in {dot}");
        }
    }
}
