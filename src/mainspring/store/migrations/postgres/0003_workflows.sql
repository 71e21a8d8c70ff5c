-- Workflows: each run's append-only journal of commands and their results.
CREATE TABLE ms_events (
    run_id     text NOT NULL REFERENCES ms_runs (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    kind       text NOT NULL,
    data       json,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
