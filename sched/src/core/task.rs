//! Task records and their storage.

use std::cmp::Ordering;

use rdask_transport::bytes::Bytes;
use rdask_transport::{ClientId, TaskId, WorkerId};
use smallvec::SmallVec;
use thin_vec::ThinVec;

/// Lifecycle: Waiting → Ready → Assigned → Memory | Erred → Released → forgotten.
/// "Running" is worker-side: the worker tells (via steal replies) whether an
/// assigned task has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Some dependency is not in memory yet.
    Waiting,
    /// All inputs are in memory; sits in the ready queue.
    Ready,
    /// Sent to `Task::assigned`, which queues or runs it.
    Assigned,
    /// Finished; the value lives on `Task::holders`.
    Memory,
    /// Finished but nobody needs the value any more; it was dropped. Kept so
    /// that lost data downstream can be recomputed.
    Released,
    /// Raised (itself or through a dependency).
    Erred,
}

/// Why a task failed.
#[derive(Debug, Clone)]
pub struct TaskError {
    pub failed_key: Box<str>,
    pub message: String,
    pub payload: Bytes,
}

/// Run order: higher user priority first, then lower graph order, then
/// earlier submission. `Ord` is arranged so the max-heap pops the next task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Priority {
    pub order: i64,
    pub user: i32,
    /// Submission sequence; wraps after 2^32 tasks, which only affects the
    /// tie-break between tasks of equal priority and order.
    pub seq: u32,
}

impl Ord for Priority {
    fn cmp(&self, other: &Self) -> Ordering {
        self.user
            .cmp(&other.user)
            .then_with(|| other.order.cmp(&self.order))
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Priority {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[derive(Debug)]
pub struct Task {
    pub key: Box<str>,
    pub payload: Bytes,
    pub deps: SmallVec<[TaskId; 2]>,
    pub dependents: SmallVec<[TaskId; 1]>,
    pub holders: SmallVec<[WorkerId; 2]>,
    /// Clients holding the key. Most tasks have none: an empty ThinVec is one
    /// null-sized pointer and allocates nothing.
    pub wanted_by: ThinVec<ClientId>,
    pub error: Option<Box<TaskError>>,
    pub priority: Priority,
    pub size: u64,
    /// Dependencies not in memory.
    pub waiting: u32,
    /// Dependents that have not finished and so still need this value.
    pub pending_dependents: u32,
    /// Dependents not yet forgotten (they may need recomputing from us).
    pub live_dependents: u32,
    pub assigned: Option<WorkerId>,
    pub retries_left: u32,
    /// Multi-batch submissions still in progress that include this task.
    pub pins: u16,
    /// Workers that died while this task ran on them (Dask's `suspicious`).
    pub suspicious: u8,
    /// The assigned worker reported that the task started running. Only
    /// meaningful while `state == Assigned`.
    pub executing: bool,
    /// The task was assigned to a worker that died without saying goodbye:
    /// from now on its worker confirms its start with the scheduler before
    /// running it (`ComputeTask::careful`).
    pub careful: bool,
    /// Set while a steal request is out: the idle worker the task is meant for.
    pub steal_to: Option<WorkerId>,
    pub state: TaskState,
}

impl Task {
    pub fn is_needed(&self) -> bool {
        !self.wanted_by.is_empty() || self.pending_dependents > 0 || self.pins > 0
    }

    /// Nothing refers to the task any more: no client, no unfinished graph
    /// submission, no live dependent.
    pub fn is_unreferenced(&self) -> bool {
        self.wanted_by.is_empty() && self.pins == 0 && self.live_dependents == 0
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, TaskState::Memory | TaskState::Released | TaskState::Erred)
    }
}

/// Generational slab: a `TaskId` is (generation << 32 | slot), so a message
/// about a forgotten task can never be mistaken for the slot's new tenant.
#[derive(Default)]
pub struct TaskSlab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    len: usize,
    /// Generation of newly made slots. After [`TaskSlab::release_if_empty`]
    /// it is above every generation handed out before, so ids from before
    /// the release never match a new task.
    base_generation: u32,
}

struct Slot {
    generation: u32,
    task: Option<Task>,
}

impl TaskSlab {
    pub fn insert(&mut self, task: Task) -> TaskId {
        self.len += 1;
        if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.generation = s.generation.wrapping_add(1);
            s.task = Some(task);
            return TaskId(((s.generation as u64) << 32) | slot as u64);
        }
        let slot = self.slots.len() as u32;
        let generation = self.base_generation;
        self.slots.push(Slot { generation, task: Some(task) });
        TaskId(((generation as u64) << 32) | slot as u64)
    }

    /// When no task is live, gives the slot memory back (a released
    /// million-task graph leaves a million empty slots otherwise). True if
    /// there was something worth giving back.
    pub fn release_if_empty(&mut self) -> bool {
        const KEEP_SLOTS: usize = 4096;
        if self.len != 0 || self.slots.capacity() <= KEEP_SLOTS {
            return false;
        }
        let newest = self.slots.iter().map(|s| s.generation).max().unwrap_or(0);
        self.base_generation = self.base_generation.max(newest.wrapping_add(1));
        self.slots = Vec::new();
        self.free = Vec::new();
        true
    }

    pub fn reserve(&mut self, n: usize) {
        self.slots.reserve(n.saturating_sub(self.free.len()));
    }

    #[inline]
    pub fn get(&self, id: TaskId) -> Option<&Task> {
        let s = self.slots.get((id.0 & 0xffff_ffff) as usize)?;
        if s.generation != (id.0 >> 32) as u32 {
            return None;
        }
        s.task.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, id: TaskId) -> Option<&mut Task> {
        let s = self.slots.get_mut((id.0 & 0xffff_ffff) as usize)?;
        if s.generation != (id.0 >> 32) as u32 {
            return None;
        }
        s.task.as_mut()
    }

    pub fn remove(&mut self, id: TaskId) -> Option<Task> {
        let slot = (id.0 & 0xffff_ffff) as usize;
        let s = self.slots.get_mut(slot)?;
        if s.generation != (id.0 >> 32) as u32 {
            return None;
        }
        let t = s.task.take()?;
        self.free.push(slot as u32);
        self.len -= 1;
        Some(t)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (TaskId, &Task)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.task.as_ref().map(|t| (TaskId(((s.generation as u64) << 32) | i as u64), t))
        })
    }
}

impl std::ops::Index<TaskId> for TaskSlab {
    type Output = Task;
    #[inline]
    fn index(&self, id: TaskId) -> &Task {
        self.get(id).unwrap_or_else(|| panic!("task {id:?} is not live"))
    }
}

impl std::ops::IndexMut<TaskId> for TaskSlab {
    #[inline]
    fn index_mut(&mut self, id: TaskId) -> &mut Task {
        self.get_mut(id).unwrap_or_else(|| panic!("task {id:?} is not live"))
    }
}
