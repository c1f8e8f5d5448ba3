//! Writing the log behind the manager's back, as the tests that check what the
//! invariant checker and the watchers make of a broken or unannounced log do.
//!
//! The log is stored as batches (`event_batches`); the `events` view shows one row per
//! event. [`make_events_writable`] installs, in a test's own database only, triggers
//! that turn an INSERT, UPDATE or DELETE of `events` rows into the batch edits they
//! mean, so a test can corrupt one event in plain SQL.

/// Makes the `events` view of this database writable, one event at a time.
pub async fn make_events_writable(db: &tokio_postgres::Client) {
    db.batch_execute(WRITABLE_EVENTS)
        .await
        .expect("install the triggers that write events one at a time");
}

const WRITABLE_EVENTS: &str = "
-- Writes the batch holding the event out in full (an element per event in each array;
-- the manager writes them compactly, see migration V29), so the event can be edited by
-- its position.
CREATE FUNCTION tamper_expand_batch(of_run uuid, at_seq bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE event_batches b
    SET seqs = x.seqs, types = x.types,
        runner_seqs = CASE WHEN b.runner_seqs IS NOT NULL THEN x.runner_seqs END
    FROM (SELECT o.last_seq, array_agg(e.seq ORDER BY e.seq) AS seqs,
                 array_agg(e.type ORDER BY e.seq) AS types,
                 array_agg(e.runner_seq ORDER BY e.seq) AS runner_seqs
          FROM event_batches o
          CROSS JOIN LATERAL event_batch_events(o.first_seq, o.seqs, o.types, o.runner_seqs,
                                                o.payloads) e
          WHERE o.run_id = of_run AND at_seq BETWEEN o.first_seq AND o.last_seq
          GROUP BY o.last_seq) x
    WHERE b.run_id = of_run AND b.last_seq = x.last_seq;
$$;

CREATE FUNCTION tamper_insert_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_batches (run_id, first_seq, last_seq, producer, runner_id, epoch,
                               created_at, seqs, types, payloads, runner_seqs)
    VALUES (NEW.run_id, NEW.seq, NEW.seq, NEW.producer, NEW.runner_id, NEW.epoch,
            coalesce(NEW.created_at, now()), ARRAY[NEW.seq], ARRAY[NEW.type],
            jsonb_build_array(NEW.payload)::text,
            CASE WHEN NEW.runner_seq IS NOT NULL THEN ARRAY[NEW.runner_seq] END);
    RETURN NEW;
END $$;

CREATE FUNCTION tamper_update_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tamper_expand_batch(OLD.run_id, OLD.seq);
    UPDATE event_batches b
    SET types[array_position(b.seqs, OLD.seq)] = NEW.type,
        payloads = jsonb_set(b.payloads::jsonb,
                             ARRAY[(array_position(b.seqs, OLD.seq) - 1)::text],
                             NEW.payload)::text
    WHERE b.run_id = OLD.run_id AND OLD.seq BETWEEN b.first_seq AND b.last_seq;
    RETURN NEW;
END $$;

CREATE FUNCTION tamper_delete_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tamper_expand_batch(OLD.run_id, OLD.seq);
    UPDATE event_batches b
    SET seqs = b.seqs[:i.p - 1] || b.seqs[i.p + 1:],
        types = b.types[:i.p - 1] || b.types[i.p + 1:],
        payloads = (b.payloads::jsonb - (i.p - 1))::text,
        runner_seqs = b.runner_seqs[:i.p - 1] || b.runner_seqs[i.p + 1:]
    FROM (SELECT array_position(seqs, OLD.seq) AS p, last_seq FROM event_batches
          WHERE run_id = OLD.run_id AND OLD.seq BETWEEN first_seq AND last_seq) i
    WHERE b.run_id = OLD.run_id AND b.last_seq = i.last_seq;
    DELETE FROM event_batches WHERE run_id = OLD.run_id AND cardinality(seqs) = 0;
    RETURN OLD;
END $$;

CREATE TRIGGER tamper_insert INSTEAD OF INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION tamper_insert_event();
CREATE TRIGGER tamper_update INSTEAD OF UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION tamper_update_event();
CREATE TRIGGER tamper_delete INSTEAD OF DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION tamper_delete_event();
";
