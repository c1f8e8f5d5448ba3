-- v30: the schema says which manager builds may still serve it. `oldest_reader` is the
-- newest migration of the oldest build that reads and writes this schema correctly; a
-- migration that older builds would misread raises it (as V28 and V29 would have, had
-- this existed). A running manager built before it stops serving within a second of
-- seeing it raised (see the manager's health probe), so a rolling upgrade cannot leave
-- an old replica misreading a newer schema. Builds before V30 do not look: stop them
-- before the new ones serve when crossing V28 or V29.
CREATE TABLE schema_compatibility (
    single       boolean PRIMARY KEY DEFAULT true CHECK (single),
    oldest_reader integer NOT NULL
);
-- V30 only adds this table: a V29 build reads the schema as it did.
INSERT INTO schema_compatibility (oldest_reader) VALUES (29);
