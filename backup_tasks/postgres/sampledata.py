"""Sample trading data: the trading app's six tables (and their enums) at a chosen size.

Used by the demo, the tests and the benchmarks. Rows are generated inside PostgreSQL
(``generate_series``), so a gigabyte takes a minute, not an hour of Python loops. The schema follows
the app's SQLAlchemy models (native enums, ``json`` columns, naive-UTC timestamps).
"""

from __future__ import annotations

import math

import psycopg

from backup_tasks.conninfo import ConnInfo
from backup_tasks.postgres.connect import connect

SCHEMA_SQL = """
CREATE TYPE sideenum AS ENUM ('LONG', 'SHORT', 'BUY', 'SELL');
CREATE TYPE decisionmode AS ENUM ('PAPER', 'LIVE');
CREATE TYPE decisionstatus AS ENUM ('PLANNED', 'SENT', 'FILLED', 'CANCELLED', 'REJECTED');
CREATE TYPE orderside AS ENUM ('BUY', 'SELL');
CREATE TYPE ordertype AS ENUM ('MARKET', 'LIMIT', 'SL', 'SLM');
CREATE TYPE orderstatus AS ENUM ('PLACED', 'PARTIAL', 'FILLED', 'CANCELLED', 'REJECTED');
CREATE TYPE positionstatus AS ENUM ('OPEN', 'CLOSING', 'CLOSED');
CREATE TYPE tradeaction AS ENUM ('OPEN', 'PARTIAL_EXIT', 'FULL_EXIT', 'REVERSAL');
CREATE TYPE auditactionenum AS ENUM ('KILL_SWITCH', 'CONFIG_FROZEN', 'MODE_CHANGE', 'PAUSE', 'RESUME',
  'FLATTEN', 'RISK_BLOCK', 'ORDER_PLACED', 'ORDER_FILLED', 'ORDER_CANCELLED', 'POSITION_OPENED', 'POSITION_CLOSED');

CREATE TABLE signals (
  id serial PRIMARY KEY, ts timestamp NOT NULL, symbol varchar NOT NULL, instrument_token bigint,
  side sideenum NOT NULL, strategy varchar, entry_price double precision, stop_loss double precision,
  take_profit_1 double precision, take_profit_2 double precision, score double precision, rank integer,
  confidence double precision, features json, feature_scores json, penalties json, rationale varchar,
  config_sha varchar);
CREATE INDEX ix_signals_ts ON signals (ts);
CREATE INDEX ix_signals_symbol ON signals (symbol);

CREATE TABLE decisions (
  id serial PRIMARY KEY, ts timestamp NOT NULL, signal_id integer REFERENCES signals (id),
  client_plan_id varchar UNIQUE, mode decisionmode NOT NULL, status decisionstatus NOT NULL,
  risk_perc double precision, risk_amount double precision, rr_expected double precision,
  position_size integer, portfolio_heat_before double precision, portfolio_heat_after double precision,
  details json, rejection_reasons json);
CREATE INDEX ix_decisions_ts ON decisions (ts);

CREATE TABLE orders (
  id serial PRIMARY KEY, ts timestamp NOT NULL, decision_id integer REFERENCES decisions (id),
  client_order_id varchar UNIQUE, broker_order_id varchar, symbol varchar NOT NULL, instrument_token bigint,
  side orderside NOT NULL, qty integer NOT NULL, order_type ordertype NOT NULL, product varchar,
  price double precision, trigger_price double precision, average_price double precision, filled_qty integer,
  status orderstatus NOT NULL, tag varchar, parent_group varchar, is_stop_loss boolean, is_take_profit boolean,
  strategy_name varchar, meta json);
CREATE INDEX ix_orders_ts ON orders (ts);
CREATE INDEX ix_orders_symbol ON orders (symbol);
CREATE INDEX ix_orders_status ON orders (status);
CREATE INDEX ix_orders_broker_order_id ON orders (broker_order_id);
CREATE INDEX ix_orders_parent_group ON orders (parent_group);
CREATE INDEX ix_orders_decision_id ON orders (decision_id);
CREATE INDEX ix_orders_strategy_name ON orders (strategy_name);
CREATE INDEX ix_orders_tag ON orders (tag);

CREATE TABLE positions (
  id serial PRIMARY KEY, position_id varchar UNIQUE NOT NULL, symbol varchar NOT NULL, instrument_token bigint,
  side sideenum NOT NULL, qty integer NOT NULL, avg_price double precision, current_price double precision,
  unrealized double precision, realized double precision, stop_loss double precision, trailing_stop double precision,
  take_profit_1 double precision, take_profit_2 double precision, risk_amount double precision,
  mfe double precision, mae double precision, oco_group varchar, opened_at timestamp, closed_at timestamp,
  status positionstatus NOT NULL, strategy_name varchar, entry_order_id varchar, exit_order_id varchar,
  exit_reason varchar);

CREATE TABLE trades (
  id serial PRIMARY KEY, position_id integer REFERENCES positions (id), ts timestamp NOT NULL,
  action tradeaction NOT NULL, qty integer, price double precision, fees double precision,
  gross_pnl double precision, net_pnl double precision, pnl_pct double precision, risk_amount double precision,
  rr_actual double precision);

CREATE TABLE audit_logs (
  id serial PRIMARY KEY, ts timestamp NOT NULL, action auditactionenum NOT NULL, level varchar,
  category varchar, message varchar NOT NULL, correlation_id varchar, config_sha varchar, details json,
  data json, signal_id integer REFERENCES signals (id), decision_id integer REFERENCES decisions (id),
  order_id integer REFERENCES orders (id), position_id integer REFERENCES positions (id));
CREATE INDEX ix_audit_logs_ts ON audit_logs (ts);
CREATE INDEX ix_audit_logs_action ON audit_logs (action);
"""


SYMBOLS = "ARRAY['NIFTY','BANKNIFTY','RELIANCE','TCS','INFY','HDFCBANK','ICICIBANK','SBIN','ITC','LT']"


#: Row generation in SQL; {n} is the number of signals, everything else scales from it.
DATA_SQL = """
INSERT INTO signals (ts, symbol, instrument_token, side, strategy, entry_price, stop_loss, take_profit_1,
  take_profit_2, score, rank, confidence, features, feature_scores, penalties, rationale, config_sha)
SELECT timestamp '2026-01-01 03:45' + (g * interval '7 seconds'),
  ({symbols})[1 + g % 10], 256265 + g % 5000, (ARRAY['LONG','SHORT','BUY','SELL'])[1 + g % 4]::sideenum,
  (ARRAY['ORB','MeanReversion','Momentum','OptionsRanker'])[1 + g % 4],
  p, p * 0.99, p * 1.01, p * 1.02, random(), 1 + g % 20, random(),
  json_build_object('rsi', round((random() * 100)::numeric, 2), 'atr', round((random() * 50)::numeric, 2),
    'vwap_dev', round((random() - 0.5)::numeric, 4), 'volume_z', round((random() * 4)::numeric, 3)),
  json_build_object('trend', round(random()::numeric, 3), 'momentum', round(random()::numeric, 3)),
  json_build_object('spread', round((random() / 10)::numeric, 4)),
  'breakout above opening range high with volume confirmation #' || g, md5((g % 97)::text)
FROM (SELECT g, round((100 + random() * 25000)::numeric, 2)::float8 AS p FROM generate_series(1, {n}) g) s;

INSERT INTO decisions (ts, signal_id, client_plan_id, mode, status, risk_perc, risk_amount, rr_expected,
  position_size, portfolio_heat_before, portfolio_heat_after, details, rejection_reasons)
SELECT s.ts + interval '1 second', s.id, 'plan-' || s.id, (ARRAY['PAPER','LIVE'])[1 + s.id % 2]::decisionmode,
  (ARRAY['PLANNED','SENT','FILLED','CANCELLED','REJECTED'])[1 + s.id % 5]::decisionstatus,
  0.5, random() * 5000, 1 + random() * 2, 1 + s.id % 500, random(), random(),
  json_build_object('lot_size', 25, 'margin', round((random() * 100000)::numeric, 2)),
  CASE WHEN s.id % 5 = 4 THEN json_build_array('heat_limit', 'max_positions') END
FROM signals s;

INSERT INTO orders (ts, decision_id, client_order_id, broker_order_id, symbol, instrument_token, side, qty,
  order_type, product, price, trigger_price, average_price, filled_qty, status, tag, parent_group,
  is_stop_loss, is_take_profit, strategy_name, meta)
SELECT d.ts + interval '2 seconds', d.id, 'co-' || d.id || '-' || k, 'BRK' || (d.id * 3 + k),
  ({symbols})[1 + d.id % 10], 256265 + d.id % 5000, (ARRAY['BUY','SELL'])[1 + (d.id + k) % 2]::orderside,
  25 * (1 + d.id % 8), (ARRAY['MARKET','LIMIT','SL','SLM'])[1 + k]::ordertype, 'MIS',
  100 + random() * 25000, CASE WHEN k = 2 THEN 100 + random() * 25000 END, 100 + random() * 25000,
  25 * (1 + d.id % 8), (ARRAY['PLACED','PARTIAL','FILLED','CANCELLED','REJECTED'])[1 + (d.id + k) % 5]::orderstatus,
  (ARRAY['ENTRY','STOP','TP1','TP2'])[1 + k], 'grp-' || d.id, k = 1, k >= 2,
  (ARRAY['ORB','MeanReversion','Momentum','OptionsRanker'])[1 + d.id % 4],
  json_build_object('latency_ms', round((random() * 40)::numeric, 1), 'exchange', 'NSE')
FROM decisions d CROSS JOIN generate_series(0, 1) k WHERE d.id % 2 = 0;

INSERT INTO positions (position_id, symbol, instrument_token, side, qty, avg_price, current_price, unrealized,
  realized, stop_loss, trailing_stop, take_profit_1, take_profit_2, risk_amount, mfe, mae, oco_group, opened_at,
  closed_at, status, strategy_name, entry_order_id, exit_order_id, exit_reason)
SELECT 'pos-' || g, ({symbols})[1 + g % 10], 256265 + g % 5000, (ARRAY['LONG','SHORT'])[1 + g % 2]::sideenum,
  25 * (1 + g % 8), p, p * 1.003, random() * 1000 - 500, random() * 2000 - 1000, p * 0.99, p * 0.995,
  p * 1.01, p * 1.02, random() * 5000, random() * 3000, random() * 3000, 'oco-' || g,
  timestamp '2026-01-01 03:50' + g * interval '70 seconds', timestamp '2026-01-01 04:50' + g * interval '70 seconds',
  (ARRAY['OPEN','CLOSING','CLOSED'])[1 + g % 3]::positionstatus,
  (ARRAY['ORB','MeanReversion','Momentum','OptionsRanker'])[1 + g % 4], 'BRK' || g, 'BRK' || (g + 1),
  (ARRAY['STOP','TP2','EOD_SQUAREOFF','TRAILING'])[1 + g % 4]
FROM (SELECT g, 100 + random() * 25000 AS p FROM generate_series(1, greatest({n} / 10, 1)) g) s;

INSERT INTO trades (position_id, ts, action, qty, price, fees, gross_pnl, net_pnl, pnl_pct, risk_amount, rr_actual)
SELECT p.id, p.opened_at + k * interval '10 minutes', (ARRAY['OPEN','PARTIAL_EXIT','FULL_EXIT'])[1 + k]::tradeaction,
  p.qty, p.avg_price * (1 + (random() - 0.5) / 50), 20 + random() * 40, random() * 2000 - 1000,
  random() * 2000 - 1040, random() * 4 - 2, p.risk_amount, random() * 3
FROM positions p CROSS JOIN generate_series(0, 2) k;

INSERT INTO audit_logs (ts, action, level, category, message, correlation_id, config_sha, details, data,
  signal_id, decision_id, order_id, position_id)
SELECT s.ts + k * interval '1 second',
  (ARRAY['ORDER_PLACED','ORDER_FILLED','ORDER_CANCELLED','POSITION_OPENED','POSITION_CLOSED','RISK_BLOCK',
         'MODE_CHANGE','PAUSE','RESUME','FLATTEN','CONFIG_FROZEN','KILL_SWITCH'])[1 + (s.id + k) % 12]::auditactionenum,
  (ARRAY['INFO','WARNING','INFO','ERROR'])[1 + (s.id + k) % 4], (ARRAY['execution','risk','system'])[1 + k % 3],
  'signal ' || s.id || ' ' || s.symbol || ' step ' || k || ': order lifecycle event recorded for audit trail',
  md5(s.id::text || k), s.config_sha,
  json_build_object('price', s.entry_price, 'qty', 25 * (1 + s.id % 8), 'reason', 'automated',
    'risk', json_build_object('heat', round(random()::numeric, 3), 'limit', 0.06)),
  json_build_object('broker_response', json_build_object('status', 'success', 'order_id', 'BRK' || s.id)),
  s.id, s.id, NULL, NULL
FROM signals s CROSS JOIN generate_series(0, 1) k;
"""


#: Approximate on-disk bytes (heap + TOAST + indexes) per signal with its dependent rows, measured on PG 15
#: (79,438 signals -> 158.7 MiB of user relations; pg_database_size adds ~7 MiB of catalogs).
BYTES_PER_SIGNAL = 2100


def signals_for_size(size_mb: float) -> int:
    return max(10, math.ceil(size_mb * 1024 * 1024 / BYTES_PER_SIGNAL))


def create_schema(conn: psycopg.Connection) -> None:
    conn.execute(SCHEMA_SQL)


def fill(conn: psycopg.Connection, signals: int) -> None:
    for statement in DATA_SQL.format(n=int(signals), symbols=SYMBOLS).split(";\n"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("ANALYZE")


def generate(conninfo: ConnInfo, *, size_mb: float | None = None, signals: int | None = None) -> dict[str, int]:
    """Create the trading schema in ``conninfo``'s (empty) database and fill it; return row counts."""
    n = signals if signals is not None else signals_for_size(size_mb or 1)
    with connect(conninfo) as conn:
        create_schema(conn)
        fill(conn, n)
        rows = conn.execute(
            "SELECT relname, n_live_tup FROM pg_stat_user_tables ORDER BY relname").fetchall()
    return {str(name): int(count) for name, count in rows}
