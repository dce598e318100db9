#!/bin/sh
# Print the package archive URI this machine's own apt sources use for SUITE and
# COMPONENT (default: bookworm main), so the build fetches packages from wherever the
# machine is already configured to, and the repository names no package host itself.
#
# Reads /etc/apt/sources.list, then /etc/apt/sources.list.d/*.list and *.sources in the
# order apt reads them; one-line ("deb [opts] URI SUITE COMPONENT...") and deb822
# ("Types: deb" / "URIs:" / "Suites:" / "Components:", "Enabled: no" skipped) stanzas
# alike. The first `deb` entry naming exactly SUITE with COMPONENT wins.
#
# Usage: scripts/apt-source.sh [SUITE [COMPONENT]]   (APT_ETC overrides /etc/apt, for tests)
set -eu

suite=${1:-bookworm}
component=${2:-main}
etc=${APT_ETC:-/etc/apt}

files=""
[ -f "$etc/sources.list" ] && files="$etc/sources.list"
if [ -d "$etc/sources.list.d" ]; then
	for f in "$etc"/sources.list.d/*; do
		case $f in
		*.list | *.sources) [ -f "$f" ] && files="$files
$f" ;;
		esac
	done
fi

found=""
if [ -n "$files" ]; then
	found=$(printf '%s\n' "$files" | sed '/^$/d' | while IFS= read -r f; do
		awk -v suite="$suite" -v comp="$component" -v deb822="$(case $f in *.sources) echo 1 ;; *) echo 0 ;; esac)" '
		function has(list, word,    n, i, a) {
			n = split(list, a, /[ \t]+/)
			for (i = 1; i <= n; i++) if (a[i] == word) return 1
			return 0
		}
		function stanza_end() {
			if (done) return
			if (types != "" && has(types, "deb") && has(suites, suite) && has(comps, comp) \
			    && tolower(enabled) != "no" && uris != "") {
				split(uris, u, /[ \t]+/); print u[1]; done = 1; exit
			}
			types = uris = suites = comps = enabled = ""; field = ""
		}
		deb822 == 0 {
			sub(/#.*/, "")
			if ($1 != "deb") next
			line = $0
			gsub(/\[[^]]*\]/, " ", line)   # options such as [arch=amd64 signed-by=...]
			n = split(line, w, /[ \t]+/)
			i = (w[1] == "") ? 2 : 1      # a leading blank makes an empty first field
			uri = w[i + 1]; s = w[i + 2]
			for (j = i + 3; j <= n; j++) if (w[j] == comp && s == suite) { print uri; exit }
			next
		}
		/^[ \t]*#/ { next }
		/^[ \t]*$/ { stanza_end(); next }
		/^[ \t]/ {                          # a continuation line of the field above
			v = $0; sub(/^[ \t]+/, "", v)
			if (field == "types") types = types " " v
			else if (field == "uris") uris = uris " " v
			else if (field == "suites") suites = suites " " v
			else if (field == "components") comps = comps " " v
			next
		}
		{
			field = tolower($0); sub(/:.*/, "", field)
			v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
			if (field == "types") types = v
			else if (field == "uris") uris = v
			else if (field == "suites") suites = v
			else if (field == "components") comps = v
			else if (field == "enabled") enabled = v
		}
		END { if (deb822 == 1 && !done) stanza_end() }
		' "$f"
	done | head -n 1)
fi

if [ -z "$found" ]; then
	echo "apt-source.sh: no 'deb' source for $suite $component in $etc/sources.list or $etc/sources.list.d/ (*.list, *.sources);" >&2
	echo "  add one there (the archive this machine installs its packages from), then run make again" >&2
	exit 1
fi
printf '%s\n' "$found"
