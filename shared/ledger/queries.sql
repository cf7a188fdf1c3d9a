-- Every query the ledger runs, each under its name. Parameters are $1, $2...; never formatted.

-- name: schema_version
SELECT coalesce(max(version), 0) FROM schema_version;

-- name: insert_steps
-- A batch of journey steps; copies of steps already recorded are skipped.
INSERT INTO journey (voucher_id, message_id, stage, attempt, outcome, at, detail, request_id)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::text[],
                     $6::timestamptz[], $7::text[], $8::text[])
ON CONFLICT (message_id, stage, attempt, outcome) DO NOTHING;

-- name: link_requests
-- A voucher whose facts name a till's request pays for it: a request of unknown outcome
-- (Jackpot's answer was lost) is linked by its RESERVED notification here.
UPDATE requests r SET voucher_id = u.voucher_id, state = 'reserved', last_change = now(),
                      reason = NULL
FROM unnest($1::uuid[], $2::text[]) AS u(voucher_id, request_id)
WHERE r.request_id = u.request_id AND r.voucher_id IS NULL
  AND r.state = ANY('{claimed,unknown}');

-- name: upsert_vouchers
-- One row per voucher of a batch: facts fill in (a known value is never erased), and the
-- state moves only to a step that is later (or as late and further along). A late RESERVED
-- or READY notification (repeated by Jackpot, or racing the intake's own RESERVED) never
-- moves a voucher back (journal.NOTIFIED).
INSERT INTO vouchers AS v (
    voucher_id, coupon_id, location_id, request_id, amount_cents, jackpot_value,
    jackpot_price, jackpot_state, state, state_at, state_rank, validity_date,
    resa_expire_date, pdf_path, pdf_bytes, doshii_status, notification, first_seen,
    last_change)
SELECT u.voucher_id, u.coupon_id, u.location_id, u.request_id, u.amount_cents,
       u.jackpot_value, u.jackpot_price, u.jackpot_state, coalesce(u.state, 'seen'),
       -- Steps that set no state come as 'seen' at -infinity: they never replace one.
       coalesce(u.state_at, '-infinity'), coalesce(u.state_rank, 0), u.validity_date,
       u.resa_expire_date,
       u.pdf_path, u.pdf_bytes, u.doshii_status, u.notification, u.first_seen,
       u.last_change
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::numeric[],
            $7::numeric[], $8::text[], $9::text[], $10::timestamptz[], $11::smallint[],
            $12::timestamptz[], $13::timestamptz[], $14::text[], $15::bigint[], $16::text[],
            $17::jsonb[], $18::timestamptz[], $19::timestamptz[])
     AS u(voucher_id, coupon_id, location_id, request_id, amount_cents, jackpot_value,
          jackpot_price, jackpot_state, state, state_at, state_rank, validity_date,
          resa_expire_date, pdf_path, pdf_bytes, doshii_status, notification, first_seen,
          last_change)
ON CONFLICT (voucher_id) DO UPDATE SET
    coupon_id = coalesce(excluded.coupon_id, v.coupon_id),
    location_id = coalesce(excluded.location_id, v.location_id),
    request_id = coalesce(excluded.request_id, v.request_id),
    amount_cents = coalesce(excluded.amount_cents, v.amount_cents),
    jackpot_value = coalesce(excluded.jackpot_value, v.jackpot_value),
    jackpot_price = coalesce(excluded.jackpot_price, v.jackpot_price),
    jackpot_state = coalesce(excluded.jackpot_state, v.jackpot_state),
    validity_date = coalesce(excluded.validity_date, v.validity_date),
    resa_expire_date = coalesce(excluded.resa_expire_date, v.resa_expire_date),
    pdf_path = coalesce(excluded.pdf_path, v.pdf_path),
    pdf_bytes = coalesce(excluded.pdf_bytes, v.pdf_bytes),
    doshii_status = coalesce(excluded.doshii_status, v.doshii_status),
    notification = coalesce(excluded.notification, v.notification),
    first_seen = least(excluded.first_seen, v.first_seen),
    last_change = greatest(excluded.last_change, v.last_change),
    state = CASE WHEN (excluded.state_at, excluded.state_rank) >= (v.state_at, v.state_rank)
                      AND NOT (excluded.state = ANY('{reserved,ready}')
                               AND excluded.state_rank < v.state_rank)
                 THEN excluded.state ELSE v.state END,
    state_rank = CASE WHEN (excluded.state_at, excluded.state_rank) >= (v.state_at, v.state_rank)
                      AND NOT (excluded.state = ANY('{reserved,ready}')
                               AND excluded.state_rank < v.state_rank)
                 THEN excluded.state_rank ELSE v.state_rank END,
    state_at = CASE WHEN (excluded.state_at, excluded.state_rank) >= (v.state_at, v.state_rank)
                      AND NOT (excluded.state = ANY('{reserved,ready}')
                               AND excluded.state_rank < v.state_rank)
                 THEN excluded.state_at ELSE v.state_at END;

-- name: find_vouchers
-- A voucher by its id, its coupon id or the Doshii request it pays for.
SELECT * FROM vouchers
WHERE voucher_id::text = $1 OR coupon_id = $1 OR request_id = $1
ORDER BY first_seen;

-- name: journey_of
-- A voucher's steps, with its request's from before the voucher existed ($2 may be null).
SELECT stage, attempt, outcome, at, detail FROM journey
WHERE voucher_id = $1 OR (voucher_id IS NULL AND request_id = $2)
ORDER BY at, id;

-- name: find_request
SELECT * FROM requests WHERE request_id = $1;

-- name: request_journey
SELECT stage, attempt, outcome, at, detail FROM journey
WHERE request_id = $1
ORDER BY at, id;

-- name: claim_request
-- The first claim of a request wins; a later one finds the row as it is.
INSERT INTO requests (request_id, location_id, amount_cents, pos_terminal_id, card_ref_hash,
                      card_ref_last4, state, received_at, claimed_at, last_change)
VALUES ($1, $2, $3, $4, $5, $6, 'claimed', $7, now(), now())
ON CONFLICT (request_id) DO NOTHING
RETURNING *;

-- name: settle_request
-- Only a request still open moves: one a voucher already pays for stays as it is.
UPDATE requests SET state = $2, voucher_id = coalesce($3, voucher_id), reason = $4,
                    last_change = now()
WHERE request_id = $1 AND voucher_id IS NULL AND state = ANY('{claimed,unknown}');

-- name: requests_unresolved
-- Claimed or of unknown outcome, with no voucher, past $1 seconds after the till's event.
SELECT * FROM requests
WHERE state = ANY('{claimed,unknown}') AND voucher_id IS NULL
  AND received_at < now() - make_interval(secs => $1)
ORDER BY received_at
LIMIT $2;

-- name: list_vouchers
-- $1 state or null, $2 stuck only, $3 changed since or null, $4 stuck after (s), $5 limit.
SELECT * FROM vouchers
WHERE ($1::text IS NULL OR state = $1)
  AND ($3::timestamptz IS NULL OR last_change >= $3)
  AND (NOT $2 OR state = ANY('{dead,refund_needed}')
       OR (state <> ALL('{activated,cancelled,rejected,expired}')
           AND last_change < now() - make_interval(secs => $4)))
ORDER BY last_change DESC
LIMIT $5;

-- name: counts_by_state
SELECT state, count(*) FROM vouchers GROUP BY state;

-- name: stuck_summary
-- $1 stuck after (s): how many are stuck, and the age of the oldest unfinished voucher.
SELECT count(*) FILTER (WHERE state = ANY('{dead,refund_needed}')
                        OR last_change < now() - make_interval(secs => $1)),
       extract(epoch FROM now() - min(first_seen))
FROM vouchers
WHERE state <> ALL('{activated,cancelled,rejected,expired}');

-- name: try_sweep_lock
SELECT pg_try_advisory_lock(hashtextextended($1, 0));

-- name: sweep_unlock
SELECT pg_advisory_unlock(hashtextextended($1, 0));

-- name: confirmed_without_ready
-- $1 confirmed for longer than this (s), $2 limit.
SELECT * FROM vouchers
WHERE state = 'confirmed'
  AND state_at < now() - make_interval(secs => $1)
  AND (next_check_at IS NULL OR next_check_at <= now())
ORDER BY state_at
LIMIT $2;

-- name: reserved_past_expiry
SELECT * FROM vouchers
WHERE state = 'reserved' AND resa_expire_date < now()
ORDER BY resa_expire_date
LIMIT $1;

-- name: activated_to_audit
-- $1 audit every (s), $2 window (s), $3 limit.
SELECT * FROM vouchers
WHERE state = 'activated'
  AND state_at > now() - make_interval(secs => $2)
  AND (audited_at IS NULL OR audited_at < now() - make_interval(secs => $1))
ORDER BY audited_at NULLS FIRST
LIMIT $3;

-- name: schedule_check
UPDATE vouchers SET next_check_at = $2, checks = checks + 1 WHERE voucher_id = $1;

-- name: mark_audited
UPDATE vouchers SET audited_at = now() WHERE voucher_id = ANY($1::uuid[]);
