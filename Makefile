# The two commands of the README. Both install what is missing first.
.PHONY: bootstrap demo test clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	.venv/bin/lungsql demo

test: bootstrap
	.venv/bin/pytest

# Stop the local database and delete it, the demo cohort and the venv.
clean:
	-.venv/bin/lungsql db stop
	rm -rf .lungsql data .venv
