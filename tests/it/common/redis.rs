//! Starts a real redis-server on a free port in a temp dir (being written).
