-- Why Kafka can never take an outbox row (it is larger than the log takes a record): the
-- relay marks it so, with `sent_at`, instead of trying it again and again. Before, one such
-- row failed every batch it was in, and no tenant's auth or control events reached the log.
-- The row keeps its envelope for operators; the relay counts it (`outbox_refused_total`).
ALTER TABLE control.outbox ADD COLUMN refused text;
