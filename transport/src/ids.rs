//! Newtype identifiers. One macro makes them all, so every id has the same
//! conversions, formatting and archived form.

/// Defines a `Copy` newtype id over an unsigned integer, archivable with rkyv.
/// The archived twin gets `get()` so in-place readers never touch raw endianness.
#[macro_export]
macro_rules! define_id {
    ($(#[$meta:meta])* $name:ident, $archived:ident, $inner:ty) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[rkyv(derive(Debug, PartialEq, Eq, Hash))]
        pub struct $name(pub $inner);

        impl $name {
            #[inline]
            pub const fn new(v: $inner) -> Self {
                Self(v)
            }
            #[inline]
            pub const fn as_num(self) -> $inner {
                self.0
            }
            #[inline]
            pub fn as_usize(self) -> usize {
                self.0 as usize
            }
        }

        impl From<$inner> for $name {
            #[inline]
            fn from(v: $inner) -> Self {
                Self(v)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl $archived {
            #[inline]
            pub fn get(&self) -> $name {
                $name(self.0.to_native())
            }
        }
    };
}

define_id!(
    /// A task known to the scheduler. Opaque: the scheduler packs
    /// `generation << 32 | slot`, so an id of a forgotten task never names
    /// the slot's next task.
    TaskId,
    ArchivedTaskId,
    u64
);
define_id!(
    /// A worker registered with the scheduler.
    WorkerId,
    ArchivedWorkerId,
    u32
);
define_id!(
    /// A client connected to the scheduler.
    ClientId,
    ArchivedClientId,
    u32
);
