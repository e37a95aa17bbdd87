# Shortcuts; the README's two commands need none of this.

.PHONY: test bench bench-compare

# The whole test suite (the README's test command).
test:
	go test -race -count=1 -timeout 45m ./...

# Go benchmarks of the hot paths, 6 samples each, in benchstat's input format:
#   make bench > old.txt; (change); make bench > new.txt; benchstat old.txt new.txt
bench:
	go test -run '^$$' -bench . -benchmem -count 6 ./registry/ ./coalesce/

# Side by side with Caddy respond/reverse_proxy, NGINX and Varnish (root, ~25 min).
bench-compare:
	bench/run.sh
