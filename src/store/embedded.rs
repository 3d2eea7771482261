//! Embedded redb backend (being written).
