//! The C2D rules on in-memory queues: limit, expiry, outcomes, delivery count, feedback.
