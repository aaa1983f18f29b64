//! The ready queue: highest priority first.
//!
//! A binary heap costs O(log n) per pop, which with 100,000 ready tasks is a
//! visible part of a task's scheduling cost. Graphs are mostly submitted in
//! priority order already (each new ready task ranks at or below the one
//! before it, e.g. equal priority and later submission), so such a run is
//! kept in a plain FIFO and only out-of-order tasks go to the heap. A pop
//! takes the better of the two fronts, so the order is exactly the heap's.

use std::collections::{BinaryHeap, VecDeque};

use rdask_transport::TaskId;

use super::Priority;

#[derive(Default)]
pub struct ReadyQueue {
    /// Non-increasing priorities, front = best.
    run: VecDeque<(Priority, TaskId)>,
    heap: BinaryHeap<(Priority, TaskId)>,
}

impl ReadyQueue {
    /// Drops every entry and the memory behind them.
    pub fn release(&mut self) {
        *self = ReadyQueue::default();
    }

    pub fn push(&mut self, priority: Priority, id: TaskId) {
        match self.run.back() {
            Some(&(last, _)) if priority > last => self.heap.push((priority, id)),
            _ => self.run.push_back((priority, id)),
        }
    }

    /// The best entry, without removing it.
    pub fn peek(&self) -> Option<(Priority, TaskId)> {
        match (self.run.front(), self.heap.peek()) {
            (Some(&a), Some(&b)) => Some(if a >= b { a } else { b }),
            (Some(&a), None) => Some(a),
            (None, Some(&b)) => Some(b),
            (None, None) => None,
        }
    }

    pub fn pop(&mut self) -> Option<(Priority, TaskId)> {
        let from_run = match (self.run.front(), self.heap.peek()) {
            (Some(a), Some(b)) => a >= b,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if from_run {
            self.run.pop_front()
        } else {
            self.heap.pop()
        }
    }

    pub fn len(&self) -> usize {
        self.run.len() + self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.run.is_empty() && self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(user: i32, order: i64, seq: u32) -> Priority {
        Priority { order, user, seq }
    }

    #[test]
    fn pops_in_exactly_the_heap_order() {
        // A deterministic mix of in-order runs and out-of-order pushes.
        let mut q = ReadyQueue::default();
        let mut reference = BinaryHeap::new();
        let mut x: u64 = 12345;
        for seq in 0..5000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let order = if x % 3 == 0 { (x >> 40) as i64 % 50 } else { 0 };
            let user = if x % 17 == 0 { 1 } else { 0 };
            let prio = p(user, order, seq);
            q.push(prio, TaskId(seq as u64));
            reference.push((prio, TaskId(seq as u64)));
            if x % 5 == 0 {
                assert_eq!(q.pop(), reference.pop());
            }
        }
        while let Some(expected) = reference.pop() {
            assert_eq!(q.peek(), Some(expected));
            assert_eq!(q.pop(), Some(expected));
        }
        assert!(q.is_empty());
    }

    #[test]
    fn submission_order_run_never_touches_the_heap() {
        let mut q = ReadyQueue::default();
        for seq in 0..1000u32 {
            q.push(p(0, -2, seq), TaskId(seq as u64));
        }
        assert!(q.heap.is_empty());
        assert_eq!(q.pop().map(|e| e.1), Some(TaskId(0)));
    }
}
