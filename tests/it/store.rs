//! Store contract tests run unchanged against both backends (being written).
