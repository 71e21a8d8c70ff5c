-- The cluster layer (mainspring.cluster): KV, registry names, process groups,
-- hub membership, processes (children), their running instances and mailboxes.

-- Cluster KV. A deleted key stays as a tombstone (value NULL) so watchers see
-- the delete; rev is a cluster-wide revision, assigned under an advisory lock
-- so revisions commit in order and a watcher reading "rev > last" never skips.
CREATE SEQUENCE ms_kv_rev;
CREATE TABLE ms_kv (
    key        text PRIMARY KEY,
    value      json,
    rev        bigint NOT NULL,
    expires_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- owned by the table, so dropping the table drops it too
ALTER SEQUENCE ms_kv_rev OWNED BY ms_kv.rev;
CREATE INDEX ms_kv_changes ON ms_kv (rev);
CREATE INDEX ms_kv_expiring ON ms_kv (expires_at) WHERE expires_at IS NOT NULL;
-- Every change (value NULL: a delete), in revision order: what watchers read.
CREATE TABLE ms_kv_log (
    rev        bigint PRIMARY KEY,
    key        text NOT NULL,
    value      json,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Registry: one row per name ever registered; pid NULL when free. The token
-- only grows, so a holder's token fences its messages.
CREATE TABLE ms_names (
    name       text PRIMARY KEY,
    pid        text,
    node       text,
    token      bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ms_names_pid ON ms_names (pid) WHERE pid IS NOT NULL;

-- Process groups: the membership (a pid joined `count` times) and its change
-- log, which every node tails into its local snapshot.
CREATE SEQUENCE ms_group_seq;
CREATE TABLE ms_group_members (
    scope text NOT NULL,
    grp   text NOT NULL,
    pid   text NOT NULL,
    node  text NOT NULL,
    count integer NOT NULL,
    PRIMARY KEY (scope, grp, pid)
);
CREATE INDEX ms_group_members_node ON ms_group_members (node);
CREATE TABLE ms_group_log (
    seq        bigint PRIMARY KEY,
    scope      text NOT NULL,
    grp        text NOT NULL,
    pid        text NOT NULL,
    node       text NOT NULL,
    delta      integer NOT NULL,
    origin     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE ms_group_seq OWNED BY ms_group_log.seq;

-- Nodes that run the hub (liveness comes from ms_nodes' heartbeat).
CREATE TABLE ms_hub_nodes (
    node      text PRIMARY KEY,
    draining  boolean NOT NULL DEFAULT false,
    joined_at timestamptz NOT NULL DEFAULT now()
);

-- Children: what should run. state_data is the last handover or checkpoint state.
CREATE TABLE ms_processes (
    child_id    text PRIMARY KEY,
    name        text NOT NULL,
    args        json,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    nodes       jsonb,
    state       text NOT NULL DEFAULT 'running' CHECK (state IN ('running','stopping','failed')),
    error       json,
    state_data  json,
    incarnation bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Instances: where each child runs now. At most one active instance per
-- child, enforced by the database (a dead node's row is deleted before a new
-- owner inserts its own).
CREATE TABLE ms_process_instances (
    child_id    text NOT NULL,
    node        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('active','replica','passive')),
    incarnation bigint NOT NULL,
    ready       boolean NOT NULL DEFAULT false,  -- init succeeded
    PRIMARY KEY (child_id, node)
);
CREATE UNIQUE INDEX ms_process_instances_active ON ms_process_instances (child_id)
    WHERE role = 'active';
CREATE INDEX ms_process_instances_node ON ms_process_instances (node);

-- Mailboxes: durable messages to children, deleted once handled.
CREATE TABLE ms_mailbox (
    seq        bigserial PRIMARY KEY,
    child_id   text NOT NULL,
    body       json NOT NULL,
    reply_to   text,
    name       text,
    token      bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ms_mailbox_child ON ms_mailbox (child_id, seq);

-- Replies to remote calls, taken by the caller.
CREATE TABLE ms_replies (
    id         text PRIMARY KEY,
    body       json,
    error      json,
    created_at timestamptz NOT NULL DEFAULT now()
);
