-- The compose stack's dev database, as testenv seeds `make dev`'s
-- (testenv.Seed and testenv.SeedApp; deploy's tests check they agree): the
-- group roles each access level's users join, a login role for static
-- levels, the database app with two tables, and vault_admin, the role Vault
-- manages users with. The postgres image runs it once, on an empty volume,
-- with psql (psql 15's \getenv reads the password from the environment).
\set ON_ERROR_STOP on
\getenv admin_password VAULT_ADMIN_PASSWORD
\if :{?admin_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'init.sql: VAULT_ADMIN_PASSWORD is not set'; END $$;
\endif

CREATE ROLE app_owner NOLOGIN;
CREATE ROLE app_read NOLOGIN;
CREATE ROLE app_write NOLOGIN;
-- A reader whose password Vault owns (a static role), for static levels.
CREATE ROLE app_report LOGIN IN ROLE app_read;
CREATE DATABASE app OWNER app_owner;
-- A superuser, because the admin level's revocation reassigns what the
-- level's user owns. Dev only.
CREATE ROLE vault_admin WITH LOGIN SUPERUSER PASSWORD :'admin_password';

\connect app
REVOKE ALL ON DATABASE app FROM PUBLIC;
GRANT CONNECT ON DATABASE app TO app_owner, app_read, app_write;
ALTER SCHEMA public OWNER TO app_owner;
SET ROLE app_owner;
CREATE TABLE items (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  created_by text NOT NULL DEFAULT current_user,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE notes (id bigserial PRIMARY KEY, item_id bigint REFERENCES items, body text NOT NULL);
INSERT INTO items (name, created_by) VALUES ('apple', 'seed'), ('pear', 'seed');
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO app_read;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO app_write;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO app_write;
RESET ROLE;
GRANT USAGE ON SCHEMA public TO app_read, app_write;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_read;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app_write;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO app_write;
