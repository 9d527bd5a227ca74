//! DAG specifications: functions chained into a graph (chain, fan-out, fan-in, map-reduce).
//!
//! The file format is a contract like the manifest (add keys, rename none):
//!
//! ```toml
//! name = "wordcount"
//! transport = "shm"            # shm | http (the baseline); an invoke may override it
//! [[nodes]]
//! id = "split"                 # a node with no `after` gets the DAG's input event
//! function = "wc-split"
//! [[nodes]]
//! id = "map"
//! function = "wc-map"
//! after = ["split"]
//! each = true                  # once per element of the predecessor's output list
//! [[nodes]]
//! id = "reduce"
//! function = "wc-reduce"
//! after = ["map"]              # fan-in: the event is the list of the outputs, in order
//! ```
//!
//! Checked here: ids, references, cycles, one sink, `each` with exactly one predecessor.
//! Whether the named functions exist is the control plane's to check.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors in a DAG specification.
#[derive(Debug, thiserror::Error)]
pub enum DagError {
    /// The TOML did not parse or had keys of the wrong type.
    #[error("Malformed DAG file")]
    Parse(#[source] toml::de::Error),
    /// The graph is not a valid DAG; the message says what is wrong.
    #[error("Invalid DAG {dag:?}: {reason}")]
    Invalid {
        /// The DAG's name.
        dag: String,
        /// What is wrong.
        reason: String,
    },
}

/// How data travels along a DAG's edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Shared memory between instances on one host.
    #[default]
    Shm,
    /// Every hop through the HTTP gateway (the baseline).
    Http,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Shm => "shm",
            Transport::Http => "http",
        })
    }
}

/// One node: a function invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique within the DAG.
    pub id: String,
    /// The function to invoke.
    pub function: String,
    /// Nodes whose outputs this one takes (none: the DAG's input).
    #[serde(default)]
    pub after: Vec<String>,
    /// Invoke once per element of the (single) predecessor's output list.
    #[serde(default)]
    pub each: bool,
    /// Run this node on that processing unit (overrides where its function would be placed;
    /// a function pinned elsewhere with its own `unit` is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u32>,
}

/// A checked DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DagSpec {
    /// DAG name (the function-name rules apply).
    pub name: String,
    /// Default transport.
    #[serde(default)]
    pub transport: Transport,
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl DagSpec {
    /// Parses and checks a DAG file.
    pub fn from_toml(text: &str) -> Result<DagSpec, DagError> {
        let spec: DagSpec = toml::from_str(text).map_err(DagError::Parse)?;
        spec.validate()?;
        Ok(spec)
    }

    fn invalid(&self, reason: String) -> DagError {
        DagError::Invalid {
            dag: self.name.clone(),
            reason,
        }
    }

    /// Checks the graph: names, unique ids, known references, no cycle, exactly one sink,
    /// `each` only after exactly one node.
    pub fn validate(&self) -> Result<(), DagError> {
        crate::validate_function_name(&self.name).map_err(|e| self.invalid(e.to_string()))?;
        if self.nodes.is_empty() {
            return Err(self.invalid("it has no nodes".into()));
        }
        let mut ids = BTreeSet::new();
        for n in &self.nodes {
            if n.id.is_empty()
                || !n
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(self.invalid(format!(
                    "node id {:?} must be letters, digits, '-' or '_'",
                    n.id
                )));
            }
            if !ids.insert(n.id.as_str()) {
                return Err(self.invalid(format!("node id {:?} is used twice", n.id)));
            }
            crate::validate_function_name(&n.function)
                .map_err(|e| self.invalid(format!("node {:?}: {e}", n.id)))?;
        }
        for n in &self.nodes {
            let mut seen = BTreeSet::new();
            for a in &n.after {
                if !ids.contains(a.as_str()) {
                    return Err(self.invalid(format!(
                        "node {:?} comes after {a:?}, which is not a node",
                        n.id
                    )));
                }
                if a == &n.id {
                    return Err(self.invalid(format!("node {:?} comes after itself", n.id)));
                }
                if !seen.insert(a) {
                    return Err(
                        self.invalid(format!("node {:?} lists {a:?} twice in `after`", n.id))
                    );
                }
            }
            if n.each && n.after.len() != 1 {
                return Err(self.invalid(format!(
                    "node {:?} has `each = true` but comes after {} nodes; `each` needs exactly one",
                    n.id,
                    n.after.len()
                )));
            }
        }
        self.order()?;
        let sinks = self.sinks();
        if sinks.len() != 1 {
            return Err(self.invalid(format!(
                "it must have exactly one sink (a node no other node comes after), whose output is the result; found {}: {sinks:?}",
                sinks.len()
            )));
        }
        Ok(())
    }

    /// Nodes no other node comes after.
    pub fn sinks(&self) -> Vec<&str> {
        let used: BTreeSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| n.after.iter().map(String::as_str))
            .collect();
        self.nodes
            .iter()
            .map(|n| n.id.as_str())
            .filter(|id| !used.contains(id))
            .collect()
    }

    /// Node indices in an order where every node follows its predecessors (Kahn's algorithm;
    /// ties keep file order). Fails on a cycle, naming a node on it.
    pub fn order(&self) -> Result<Vec<usize>, DagError> {
        let index: BTreeMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let mut indegree: Vec<usize> = self.nodes.iter().map(|n| n.after.len()).collect();
        let mut next: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for a in &n.after {
                if let Some(&j) = index.get(a.as_str()) {
                    next[j].push(i);
                }
            }
        }
        let mut ready: VecDeque<usize> = (0..self.nodes.len())
            .filter(|&i| indegree[i] == 0)
            .collect();
        let mut out = Vec::with_capacity(self.nodes.len());
        while let Some(i) = ready.pop_front() {
            out.push(i);
            for &k in &next[i] {
                indegree[k] -= 1;
                if indegree[k] == 0 {
                    ready.push_back(k);
                }
            }
        }
        if out.len() != self.nodes.len() {
            let stuck = (0..self.nodes.len())
                .find(|&i| indegree[i] > 0)
                .map(|i| self.nodes[i].id.clone())
                .unwrap_or_default();
            return Err(self.invalid(format!("it has a cycle (through node {stuck:?})")));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDCOUNT: &str = r#"
name = "wordcount"
transport = "shm"
[[nodes]]
id = "split"
function = "wc-split"
[[nodes]]
id = "map"
function = "wc-map"
after = ["split"]
each = true
[[nodes]]
id = "reduce"
function = "wc-reduce"
after = ["map"]
"#;

    #[test]
    fn the_design_example_parses() {
        let d = DagSpec::from_toml(WORDCOUNT).unwrap();
        assert_eq!(d.transport, Transport::Shm);
        assert_eq!(d.order().unwrap(), vec![0, 1, 2]);
        assert_eq!(d.sinks(), vec!["reduce"]);
    }

    #[test]
    fn fan_out_and_fan_in() {
        let d = DagSpec::from_toml(
            r#"
name = "diamond"
transport = "http"
[[nodes]]
id = "sink"
function = "f"
after = ["left", "right"]
[[nodes]]
id = "left"
function = "f"
after = ["src"]
[[nodes]]
id = "right"
function = "f"
after = ["src"]
[[nodes]]
id = "src"
function = "f"
"#,
        )
        .unwrap();
        let order: Vec<&str> = d
            .order()
            .unwrap()
            .iter()
            .map(|&i| d.nodes[i].id.as_str())
            .collect();
        assert_eq!(order, ["src", "left", "right", "sink"]);
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        let node = |id: &str, after: &str| {
            format!("[[nodes]]\nid = \"{id}\"\nfunction = \"f\"\nafter = [{after}]\n")
        };
        let cases = [
            (format!("name = \"d\"\n{}{}", node("a", "\"b\""), node("b", "\"a\"")), "cycle"),
            (format!("name = \"d\"\n{}", node("a", "\"zzz\"")), "not a node"),
            (format!("name = \"d\"\n{}{}", node("a", ""), node("a", "")), "used twice"),
            (format!("name = \"d\"\n{}{}{}", node("a", ""), node("b", "\"a\""), node("c", "\"a\"")), "exactly one sink"),
            (format!("name = \"d\"\n{}", node("a", "\"a\"")), "after itself"),
            ("name = \"d\"\nnodes = []".to_owned(), "no nodes"),
            (format!("name = \"bad name\"\n{}", node("a", "")), "name"),
            (format!("name = \"d\"\n{}{}{}[[nodes]]\nid = \"m\"\nfunction = \"f\"\nafter = [\"a\", \"b\"]\neach = true\n", node("a", ""), node("b", ""), ""), "exactly one"),
        ];
        for (text, needle) in cases {
            let err = DagSpec::from_toml(&text).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{needle:?} not in {err:?} for\n{text}"
            );
        }
        assert!(matches!(
            DagSpec::from_toml("name = 1"),
            Err(DagError::Parse(_))
        ));
        assert!(matches!(
            DagSpec::from_toml(
                "name = \"d\"\ntransport = \"pigeon\"\n[[nodes]]\nid = \"a\"\nfunction = \"f\"\n"
            ),
            Err(DagError::Parse(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn order_respects_edges_and_back_edges_are_cycles(
            n in 2usize..12,
            edges in proptest::collection::vec((0usize..12, 0usize..12), 0..30),
        ) {
            // Edges only from a lower to a higher index: acyclic. Every node feeds the last,
            // which is then the only sink.
            let mut after: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
            for (a, b) in edges {
                let (a, b) = (a % n, b % n);
                if a < b {
                    after[b].insert(a);
                }
            }
            for a in 0..n - 1 {
                after[n - 1].insert(a);
            }
            let node = |i: usize, deps: &BTreeSet<usize>| Node {
                id: format!("n{i}"),
                function: "f".into(),
                after: deps.iter().map(|d| format!("n{d}")).collect(),
                each: false,
                unit: None,
            };
            let mut spec = DagSpec {
                name: "p".into(),
                transport: Transport::Http,
                nodes: after.iter().enumerate().map(|(i, d)| node(i, d)).rev().collect(),
            };
            spec.validate().unwrap();
            let order = spec.order().unwrap();
            let pos: BTreeMap<&str, usize> = order.iter().enumerate().map(|(p, &i)| (spec.nodes[i].id.as_str(), p)).collect();
            for nd in &spec.nodes {
                for a in &nd.after {
                    proptest::prop_assert!(pos[a.as_str()] < pos[nd.id.as_str()]);
                }
            }
            // A back edge from the sink to the first node closes a cycle.
            let first = spec.nodes.iter().position(|nd| nd.id == "n0").unwrap();
            spec.nodes[first].after.push(format!("n{}", n - 1));
            proptest::prop_assert!(spec.order().unwrap_err().to_string().contains("cycle"));
        }
    }
}
