-- Search: the workflow query (mainspring.search) filters a namespace's runs by state
-- and attributes and pages them in time order. These indexes serve its ordered
-- pages. There is no JSON index (attributes is text) and no (namespace, state)
-- index: with statistics SQLite may skip-scan such an index for the hot path's
-- "state = ..." statements (see 0001).

-- a namespace's runs newest (or oldest) first, paged by (created_at, id)
CREATE INDEX ms_runs_namespace_created ON ms_runs (namespace, created_at, id)
    WHERE kind = 'workflow';
-- the same by start time; ordering by started_at lists only started runs
CREATE INDEX ms_runs_namespace_started ON ms_runs (namespace, started_at, id)
    WHERE kind = 'workflow' AND started_at IS NOT NULL;
