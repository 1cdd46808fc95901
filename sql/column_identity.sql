-- Column identity for cdc (optional): after every ALTER TABLE, write the table's columns with their
-- numbers (pg_attribute.attnum) into the WAL as a transactional logical decoding message, ordered
-- with the rows around it. The connector then knows which column each name of the next Relation
-- message is, even where comparing with the catalog is not conclusive (several schema changes at
-- once while it lags). See docs/privacy.md, "Renamed columns".
--
-- Run once per source database as a superuser (CREATE EVENT TRIGGER needs one):
--   psql -d shop -f sql/column_identity.sql
-- Remove with: DROP EVENT TRIGGER cdc_column_identity; DROP FUNCTION cdc_column_identity();

CREATE OR REPLACE FUNCTION cdc_column_identity() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    tbl oid;
BEGIN
    FOR tbl IN
        SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
        WHERE c.classid = 'pg_class'::regclass AND c.object_type IN ('table', 'table column')
    LOOP
        PERFORM pg_logical_emit_message(true, 'cdc.columns', json_build_object(
            'oid', tbl,
            'columns', (SELECT json_agg(json_build_array(a.attnum, a.attname) ORDER BY a.attnum)
                        FROM pg_attribute a
                        WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped)
        )::text);
    END LOOP;
END
$$;

DROP EVENT TRIGGER IF EXISTS cdc_column_identity;
CREATE EVENT TRIGGER cdc_column_identity ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION cdc_column_identity();
