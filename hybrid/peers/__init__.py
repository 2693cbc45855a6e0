"""Runtimes people would pick instead, measured beside the routes by `bench --peers`."""
