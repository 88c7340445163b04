-- The worker's schema, designed once for the journal, the event outbox, webhooks, the upstream
-- push and the dialer. Applied by worker/store/schema.py under an advisory lock.

-- One row per workspace that has had an event: its row lock orders the workspace's events, so
-- outbox ids within a workspace are committed in increasing order (a reader that keeps "the
-- last id seen" per workspace never skips one).
CREATE TABLE event_heads (
    workspace_id bigint PRIMARY KEY
);

-- The call journal.
CREATE TABLE calls (
    id               bigserial PRIMARY KEY,
    call_id          text NOT NULL UNIQUE,
    workspace_id     bigint NOT NULL,
    node_id          text,
    worker_id        text,
    direction        text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    status           text NOT NULL,
    subscriber_phone text,
    from_number      text,
    to_number        text,
    route            text,
    duration_sec     integer NOT NULL DEFAULT 0,
    summary          text,
    transcript       jsonb NOT NULL DEFAULT '[]'::jsonb,
    conversation_id  text,
    has_audio        boolean NOT NULL DEFAULT false,
    recording_path   text,
    parent_call_id   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    answered_at      timestamptz,
    ended_at         timestamptz,
    hangup_cause     text,
    sip_status       integer,
    media            jsonb
);
CREATE INDEX calls_workspace ON calls (workspace_id, id);
CREATE INDEX calls_node ON calls (workspace_id, node_id, id);
CREATE INDEX calls_parent ON calls (parent_call_id) WHERE parent_call_id IS NOT NULL;

-- Every event, in the transaction of the journal change it describes. The hub, SSE, webhooks
-- and the upstream push all read from here; rows are kept (the calls' event history).
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    event_uid    text NOT NULL UNIQUE,  -- given when published: a retried write is a no-op
    workspace_id bigint NOT NULL,
    call_id      text,
    type         text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX outbox_workspace ON outbox (workspace_id, id);
CREATE INDEX outbox_call ON outbox (call_id, id) WHERE call_id IS NOT NULL;

-- A call's events, as GET /telephony/calls/{call_id}/events reads them.
CREATE VIEW call_events AS
    SELECT id, workspace_id, call_id, type, payload, created_at FROM outbox
    WHERE call_id IS NOT NULL;

-- Webhooks: endpoints registered through the API, one delivery row per (endpoint, event),
-- created with the event; claimed by one worker at a time (FOR UPDATE SKIP LOCKED).
CREATE TABLE webhook_endpoints (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL,
    url          text NOT NULL,
    event_types  text[] NOT NULL DEFAULT '{}',  -- empty: every type
    secret       text NOT NULL,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id) WHERE enabled;

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        bigint NOT NULL REFERENCES outbox (id),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    first_failed_at timestamptz,
    last_status     integer,
    last_error      text,
    claimed_by      text,
    claimed_until   timestamptz,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

-- The upstream push: the last outbox id the API's hub acknowledged, per workspace.
CREATE TABLE upstream_cursors (
    workspace_id  bigint PRIMARY KEY,
    last_event_id bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The dialer: campaigns and their numbers (a paused campaign keeps its remaining numbers).
CREATE TABLE campaigns (
    id             bigserial PRIMARY KEY,
    call_id        text NOT NULL UNIQUE,          -- "camp_..." (the seed's campaign call_id)
    workspace_id   bigint NOT NULL,
    node_id        text,
    agent_node_id  text,
    name           text,
    status         text NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'paused', 'completed', 'stopped', 'failed')),
    max_concurrent integer NOT NULL DEFAULT 1 CHECK (max_concurrent >= 1),
    numbers_count  integer NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    stopped_at     timestamptz
);
CREATE INDEX campaigns_workspace ON campaigns (workspace_id, id);

CREATE TABLE campaign_numbers (
    campaign_id bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    position    integer NOT NULL,
    number      text NOT NULL,
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'claimed', 'done', 'failed')),
    call_id     text,
    claimed_by  text,
    claimed_at  timestamptz,
    PRIMARY KEY (campaign_id, position)
);
CREATE INDEX campaign_numbers_pending ON campaign_numbers (campaign_id, position)
    WHERE state = 'pending';
