-- Search: the workflow query (mainspring.search) filters a namespace's runs by state
-- and attributes and pages them in time order. These indexes serve its common
-- forms, so they never scan the table. They hold workflow runs only: jobs and
-- machines, whose hot path rewrites every index entry on each state change,
-- never pay for them.

-- eq, in and contains on attributes, all written as attributes @> '{"plan": "pro"}'
CREATE INDEX ms_runs_attributes ON ms_runs USING gin (attributes jsonb_path_ops)
    WHERE kind = 'workflow';
-- a namespace's runs newest (or oldest) first, paged by (created_at, id)
CREATE INDEX ms_runs_namespace_created ON ms_runs (namespace, created_at, id)
    WHERE kind = 'workflow';
-- the same by start time; ordering by started_at lists only started runs
CREATE INDEX ms_runs_namespace_started ON ms_runs (namespace, started_at, id)
    WHERE kind = 'workflow' AND started_at IS NOT NULL;
