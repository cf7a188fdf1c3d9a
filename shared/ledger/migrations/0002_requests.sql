-- The till's requests: each Doshii activation request claimed once, before any reservation.

CREATE TABLE requests (
    request_id     text PRIMARY KEY,
    location_id    text NOT NULL,
    amount_cents   bigint NOT NULL,
    pos_terminal_id text,
    -- A keyed hash of the card reference and its last four characters; never the reference.
    card_ref_hash  text,
    card_ref_last4 text,
    -- claimed: taken by an intake worker; reserved: a voucher pays for it; cancelled: told
    -- Doshii why not; unknown: Jackpot may have reserved (a lost answer), the sweeper decides.
    state          text NOT NULL,
    voucher_id     uuid,
    reason         text,
    received_at    timestamptz NOT NULL,
    -- The one-time Jackpot JWT is signed with this time, so a retry signs the same JWT
    -- again instead of a second, valid one.
    claimed_at     timestamptz NOT NULL,
    last_change    timestamptz NOT NULL
);

CREATE INDEX requests_state ON requests (state, received_at);
CREATE INDEX requests_voucher ON requests (voucher_id);

-- Steps of a request before (or without) a voucher: journey rows keyed by the request.
ALTER TABLE journey ALTER COLUMN voucher_id DROP NOT NULL;
ALTER TABLE journey ADD COLUMN request_id text;
ALTER TABLE journey ADD CONSTRAINT journey_has_an_owner
    CHECK (voucher_id IS NOT NULL OR request_id IS NOT NULL);
CREATE INDEX journey_request ON journey (request_id, at);
