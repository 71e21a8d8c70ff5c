-- Workflows: each run's append-only journal of commands and their results.
CREATE TABLE ms_events (
    run_id     text NOT NULL,
    seq        integer NOT NULL,
    kind       text NOT NULL,
    data       text,
    created_at real NOT NULL,
    PRIMARY KEY (run_id, seq)
);
