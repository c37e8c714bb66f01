# Shortcuts; each target is one script under scripts/.
.PHONY: setup test demo ollama bench
setup:
	scripts/setup.sh
test:
	scripts/test.sh
demo:
	scripts/demo.sh
ollama:
	.venv/bin/python -m ollama_ft.ollama_server install
bench:
	.venv/bin/python -m benchmarks.run
