#!/usr/bin/env bash
# Runs PEFT's own Lily tests with lily_ext.patch_peft() applied, so PEFT's Lily layers compute
# through lily_ext.ops. Usage: scripts/peft_tests_with_patch.sh /path/to/peft-checkout
# (a checkout of github.com/huggingface/peft; its tests need: diffusers datasets parameterized scipy)
set -euo pipefail
peft_dir=${1:?usage: $0 /path/to/peft-checkout}
plugin_dir=$(mktemp -d)
trap 'rm -rf "$plugin_dir"' EXIT
echo "import lily_ext; lily_ext.patch_peft()" > "$plugin_dir/lily_patch_plugin.py"
cd "$peft_dir"
PYTHONPATH="$plugin_dir:$peft_dir" python -m pytest -q -p lily_patch_plugin tests/test_custom_models.py -k "lily or Lily" "${@:2}"
