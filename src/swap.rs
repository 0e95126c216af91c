//! [`Swap`]: a value that readers load cheaply and a live reload replaces whole.
//!
//! Readers (a request's guard, a worker batch, a status read) take the current `Arc` and work
//! with it; a reload builds the new value off to the side and stores it in one step. A reader
//! therefore sees either the old value or the new one, never a mix, and keeps the one it loaded
//! until it is done with it.
//!
//! A `std::sync::RwLock<Arc<T>>` rather than the `arc-swap` crate: a load is one uncontended
//! read lock and an `Arc` clone (tens of nanoseconds), taken once per request or per batch,
//! never per sample, and stores happen only on a reload. arc-swap's lock-free loads would save
//! nothing measurable here and add a dependency.

use std::sync::{Arc, RwLock};

/// A shared value replaced whole on reload.
#[derive(Debug)]
pub struct Swap<T: ?Sized> {
    current: RwLock<Arc<T>>,
}

impl<T: ?Sized> Swap<T> {
    /// A cell holding `value`.
    pub fn new(value: Arc<T>) -> Self {
        Self {
            current: RwLock::new(value),
        }
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        // Nothing panics while the lock is held (a clone or an assignment of an `Arc`).
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the value; readers that loaded the old one keep it until they drop it.
    pub fn store(&self, value: Arc<T>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_what_it_loaded_and_the_next_load_sees_the_new_value() {
        let swap = Swap::new(Arc::new(1));
        let before = swap.load();
        swap.store(Arc::new(2));
        assert_eq!((*before, *swap.load()), (1, 2));
        let slice: Swap<[u8]> = Swap::new(Arc::from(vec![1, 2]));
        slice.store(Arc::from(vec![3]));
        assert_eq!(&*slice.load(), &[3]);
    }
}
