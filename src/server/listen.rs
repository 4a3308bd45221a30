//! Serving the router on a socket. (Skeleton: the operational helper fills in header timeouts and graceful shutdown.)
