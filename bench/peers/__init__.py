"""The peers mailqd is measured against in bench/bench_coldstart.py."""
