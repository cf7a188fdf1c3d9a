-- The ledger: one row per voucher, and the append-only journey of its steps.

CREATE TABLE vouchers (
    voucher_id       uuid PRIMARY KEY,
    coupon_id        text,
    location_id      text,
    request_id       text,
    amount_cents     bigint,
    jackpot_value    numeric,
    jackpot_price    numeric,
    jackpot_state    text,
    -- The ledger's own view of where the voucher is (see shared/journal.py, STATES).
    state            text NOT NULL,
    state_at         timestamptz NOT NULL,
    state_rank       smallint NOT NULL,
    validity_date    timestamptz,
    resa_expire_date timestamptz,
    pdf_path         text,
    pdf_bytes        bigint,
    doshii_status    text,
    -- The last Jackpot notification, its signed link removed: what the sweeper resends.
    notification     jsonb,
    first_seen       timestamptz NOT NULL,
    last_change      timestamptz NOT NULL,
    -- The sweeper's bookkeeping: when to ask a partner again, and how often it has.
    next_check_at    timestamptz,
    checks           integer NOT NULL DEFAULT 0,
    audited_at       timestamptz
);

CREATE INDEX vouchers_coupon_id ON vouchers (coupon_id);
CREATE INDEX vouchers_request_id ON vouchers (request_id);
CREATE INDEX vouchers_state ON vouchers (state, state_at);

CREATE TABLE journey (
    id          bigserial PRIMARY KEY,
    voucher_id  uuid NOT NULL,
    message_id  text NOT NULL,
    stage       text NOT NULL,
    attempt     integer NOT NULL,
    outcome     text NOT NULL,
    at          timestamptz NOT NULL,
    detail      text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    -- A redelivered or duplicate message repeats its step: this key makes the copy a no-op.
    UNIQUE (message_id, stage, attempt, outcome)
);

CREATE INDEX journey_voucher ON journey (voucher_id, at);
