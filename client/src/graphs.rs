//! Benchmark and test graphs of null tasks. Each null task outputs
//! `1 + sum of its inputs`, so every graph has a known result at its root.

use crate::TaskDef;

/// A named graph with the value its root must produce.
pub struct Graph {
    pub name: String,
    pub tasks: Vec<TaskDef>,
    pub root: String,
    pub expected: u64,
}

impl Graph {
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

/// `merge-N`: N independent tasks and one that depends on all of them.
pub fn merge(n: usize, prefix: &str) -> Graph {
    let mut tasks: Vec<TaskDef> = (0..n).map(|i| TaskDef::new(format!("{prefix}m{i}"), vec![])).collect();
    let root = format!("{prefix}merge");
    tasks.push(TaskDef::new(&root, tasks.iter().map(|t| t.key.clone()).collect()).wanted());
    Graph { name: format!("merge-{n}"), tasks, root, expected: n as u64 + 1 }
}

/// `tree-D`: a binary reduction tree with 2^D leaves (2^(D+1) - 1 tasks).
pub fn tree(depth: u32, prefix: &str) -> Graph {
    let mut tasks = Vec::new();
    let mut level: Vec<String> = (0..1usize << depth).map(|i| format!("{prefix}t{depth}-{i}")).collect();
    for k in &level {
        tasks.push(TaskDef::new(k.clone(), vec![]));
    }
    for d in (0..depth).rev() {
        let next: Vec<String> = (0..level.len() / 2).map(|i| format!("{prefix}t{d}-{i}")).collect();
        for (i, k) in next.iter().enumerate() {
            tasks.push(TaskDef::new(k.clone(), vec![level[2 * i].clone(), level[2 * i + 1].clone()]));
        }
        level = next;
    }
    let root = level.pop().unwrap();
    tasks.last_mut().unwrap().want = true;
    let n = tasks.len() as u64;
    Graph { name: format!("tree-{depth}"), tasks, root, expected: n }
}

/// `chain-N`: N tasks, each depending on the previous one.
pub fn chain(n: usize, prefix: &str) -> Graph {
    assert!(n > 0);
    let mut tasks = vec![TaskDef::new(format!("{prefix}c0"), vec![])];
    for i in 1..n {
        tasks.push(TaskDef::new(format!("{prefix}c{i}"), vec![format!("{prefix}c{}", i - 1)]));
    }
    tasks.last_mut().unwrap().want = true;
    let root = tasks.last().unwrap().key.clone();
    Graph { name: format!("chain-{n}"), tasks, root, expected: n as u64 }
}

/// `shuffle-P`: P inputs, P outputs that each read every input (P² edges,
/// data moves all-to-all), and a final task over the outputs.
pub fn shuffle(p: usize, prefix: &str) -> Graph {
    let inputs: Vec<String> = (0..p).map(|i| format!("{prefix}si{i}")).collect();
    let mut tasks: Vec<TaskDef> = inputs.iter().map(|k| TaskDef::new(k.clone(), vec![])).collect();
    let outputs: Vec<String> = (0..p).map(|i| format!("{prefix}so{i}")).collect();
    for k in &outputs {
        tasks.push(TaskDef::new(k.clone(), inputs.clone()));
    }
    let root = format!("{prefix}shuffle");
    tasks.push(TaskDef::new(&root, outputs).wanted());
    let p = p as u64;
    Graph { name: format!("shuffle-{p}"), tasks, root, expected: 1 + p * (1 + p) }
}

/// Parses "merge-100000", "tree-15", "chain-1000", "shuffle-64".
pub fn by_name(spec: &str, prefix: &str) -> Result<Graph, String> {
    let (kind, n) = spec.split_once('-').ok_or_else(|| format!("graph {spec:?}: expected KIND-N"))?;
    let n: usize = n.parse().map_err(|_| format!("graph {spec:?}: N is not a number"))?;
    match kind {
        "merge" => Ok(merge(n, prefix)),
        "tree" if n <= 24 => Ok(tree(n as u32, prefix)),
        "chain" if n > 0 => Ok(chain(n, prefix)),
        "shuffle" if n > 0 => Ok(shuffle(n, prefix)),
        _ => Err(format!("unknown graph {spec:?} (merge-N, tree-D (D ≤ 24), chain-N, shuffle-P)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_expected_roots() {
        let t = tree(3, "");
        assert_eq!(t.len(), 15);
        assert_eq!(t.expected, 15);
        assert!(t.tasks.iter().any(|x| x.key == t.root && x.want));
        let m = merge(10, "x-");
        assert_eq!(m.len(), 11);
        assert_eq!(m.tasks.last().unwrap().deps.len(), 10);
        let s = shuffle(4, "");
        assert_eq!(s.len(), 9);
        assert_eq!(s.expected, 21);
        assert_eq!(chain(5, "").expected, 5);
        assert!(by_name("tree-99", "").is_err());
    }
}
