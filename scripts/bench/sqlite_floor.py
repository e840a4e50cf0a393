#!/usr/bin/env python3
"""The SQLite floor: a plain loop of single-row commits, WAL with synchronous=FULL.
Usage: sqlite_floor.py [N] [PATH]"""
import sqlite3, time, os, sys
path = sys.argv[2] if len(sys.argv) > 2 else "floor.db"
for suffix in ("", "-wal", "-shm"):
    try: os.remove(path + suffix)
    except FileNotFoundError: pass
db = sqlite3.connect(path, isolation_level=None)
db.execute("pragma journal_mode=wal"); db.execute("pragma synchronous=full")
db.execute("create table t (id integer primary key, v int)")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
start = time.perf_counter()
for i in range(n):
    db.execute("begin"); db.execute("insert into t (v) values (?)", (i,)); db.execute("commit")
el = time.perf_counter() - start
print(f"{n/el:.0f} commits/s")
