// Reads what the fake driver needs from a PTX module as nvcc writes it: .version and .target, and
// per .entry its parameter list, its thread limit (.maxntid/.reqntid, from __launch_bounds__) and
// its static shared memory. The driver checks the parameters against the C++ kernel it will run,
// and the launch against the limits. Checked against ptxas -v on finch's real PTX: the static
// shared memory of every entry matches.
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "fake.h"

namespace fake {
namespace {

bool ident_char(char c) { return isalnum((unsigned char)c) || c == '_' || c == '$'; }

// The text without // and /* */ comments (none occur inside PTX strings that matter here).
std::string strip_comments(const char* t) {
    std::string s;
    s.reserve(strlen(t));
    for (const char* p = t; *p;) {
        if (p[0] == '/' && p[1] == '/') {
            while (*p && *p != '\n') p++;
        } else if (p[0] == '/' && p[1] == '*') {
            const char* e = strstr(p + 2, "*/");
            p = e ? e + 2 : p + strlen(p);
            s += ' ';
        } else {
            s += *p++;
        }
    }
    return s;
}

// Whitespace-separated words of a declaration, with ',' '(' ')' ';' as separators too.
std::vector<std::string> words(const std::string& s) {
    std::vector<std::string> w;
    std::string cur;
    for (char c : s) {
        if (isspace((unsigned char)c) || c == ',' || c == '(' || c == ')' || c == ';') {
            if (!cur.empty()) w.push_back(cur), cur.clear();
        } else {
            cur += c;
        }
    }
    if (!cur.empty()) w.push_back(cur);
    return w;
}

bool has_word(const std::vector<std::string>& w, const char* x) {
    for (auto& s : w)
        if (s == x) return true;
    return false;
}

// Bytes of one element of a PTX fundamental type (.b8 ... .b128, .f16x2, .bf16), 0 if not one.
size_t type_size(const std::string& t) {
    if (t.size() < 3 || t[0] != '.') return 0;
    const char k = t[1];
    if (k != 'b' && k != 'u' && k != 's' && k != 'f') return 0;
    const char* bits = t.c_str() + 2;
    if (t.rfind(".bf16", 0) == 0) bits = t.c_str() + 4;
    char* end;
    long n = strtol(bits, &end, 10);
    if (end == bits || (n != 8 && n != 16 && n != 32 && n != 64 && n != 128)) return 0;
    size_t size = (size_t)n / 8;
    if (strcmp(end, "x2") == 0) size *= 2;  // .f16x2, .bf16x2
    else if (*end) return 0;
    return size;
}

// A declaration's type, element count and name: ".shared .align 16 .b8 NAME[16384];",
// ".param .u64 .ptr .align 1 NAME", ".param .align 8 .b8 NAME[16]", ".shared .v4 .f32 x[2]".
struct Decl {
    size_t bytes = 0;  // element size × count (0 for an unsized `[]`)
    char kind = 'b';
    std::string name;
};
Decl parse_decl(const std::string& text) {
    Decl d;
    size_t elem = 0, vec = 1;
    for (const std::string& w : words(text)) {
        if (size_t sz = type_size(w)) {
            elem = sz;
            d.kind = w.rfind(".f", 0) == 0 ? 'f' : (w[1] == 'b' ? 'b' : 'i');
        } else if (w == ".v2") {
            vec = 2;
        } else if (w == ".v4") {
            vec = 4;
        } else if (w[0] != '.' && !isdigit((unsigned char)w[0])) {
            d.name = w;  // the last plain word; array bounds stay attached: NAME[16][4]
        }
    }
    size_t count = 1, b = d.name.find('[');
    if (b != std::string::npos) {
        for (size_t q = b; q < d.name.size() && d.name[q] == '[';) {
            size_t e = d.name.find(']', q);
            count *= (e == q + 1) ? 0 : (size_t)strtoull(d.name.c_str() + q + 1, nullptr, 10);
            q = e == std::string::npos ? d.name.size() : e + 1;
        }
        d.name.resize(b);
    }
    d.bytes = elem * vec * count;
    return d;
}

// Index just past the '}' matching the '{' at s[open].
size_t block_end(const std::string& s, size_t open) {
    int depth = 0;
    for (size_t i = open; i < s.size(); i++) {
        if (s[i] == '{') depth++;
        else if (s[i] == '}' && --depth == 0) return i + 1;
    }
    return s.size();
}

struct Function {
    std::string name;
    bool is_entry = false;
    PtxEntry entry;
    std::string body;
    size_t local_smem = 0;  // demoted .shared declared inside the body
};

}  // namespace

bool parse_ptx(const char* text, PtxModule* out, std::string* error) {
    const std::string s = strip_comments(text);
    std::map<std::string, size_t> module_shared;  // module-scope .shared symbol -> bytes
    std::map<std::string, Function> functions;
    std::vector<std::string> entry_order;
    size_t pos = 0;
    while (pos < s.size()) {
        while (pos < s.size() && isspace((unsigned char)s[pos])) pos++;
        if (pos >= s.size()) break;
        if (s[pos] == '{') {  // a block of its own (.section .debug_str { ... })
            pos = block_end(s, pos);
            continue;
        }
        // Line directives have no terminator.
        const size_t eol = std::min(s.find('\n', pos), s.size());
        const std::string line = s.substr(pos, eol - pos);
        const std::vector<std::string> lw = words(line);
        if (!lw.empty() && (lw[0] == ".version" || lw[0] == ".target" || lw[0] == ".address_size" ||
                            lw[0] == ".file" || lw[0] == ".section" || lw[0] == ".loc")) {
            if (lw[0] == ".version" && lw.size() > 1) sscanf(lw[1].c_str(), "%d.%d", &out->version_major, &out->version_minor);
            if (lw[0] == ".target" && lw.size() > 1) out->target = lw[1];
            pos = eol;
            continue;
        }
        // Otherwise a statement up to ';' or '{' outside parentheses.
        size_t q = pos;
        int paren = 0;
        while (q < s.size() && !(paren == 0 && (s[q] == ';' || s[q] == '{'))) {
            if (s[q] == '(') paren++;
            if (s[q] == ')') paren--;
            q++;
        }
        const std::string stmt = s.substr(pos, q - pos);
        const std::vector<std::string> w = words(stmt);
        const bool is_entry = has_word(w, ".entry"), is_func = has_word(w, ".func");
        if ((is_entry || is_func) && q < s.size() && s[q] == '{') {
            // NAME(params) directives; a .func may have a return list first: .func (.param .b32 r) NAME(...)
            size_t k = stmt.find(is_entry ? ".entry" : ".func") + (is_entry ? 6 : 5);
            while (k < stmt.size() && isspace((unsigned char)stmt[k])) k++;
            if (is_func && k < stmt.size() && stmt[k] == '(') {
                k = stmt.find(')', k) + 1;
                while (k < stmt.size() && isspace((unsigned char)stmt[k])) k++;
            }
            size_t ne = k;
            while (ne < stmt.size() && ident_char(stmt[ne])) ne++;
            Function f;
            f.name = stmt.substr(k, ne - k);
            f.is_entry = is_entry;
            f.entry.name = f.name;
            const size_t open = stmt.find('(', ne), close = stmt.rfind(')');
            if (open != std::string::npos && close != std::string::npos && close > open) {
                const std::string plist = stmt.substr(open + 1, close - open - 1);
                for (size_t p = plist.find(".param"); p != std::string::npos; p = plist.find(".param", p + 6)) {
                    const size_t e = std::min(plist.find(',', p), plist.size());
                    const Decl d = parse_decl(plist.substr(p, e - p));
                    f.entry.params.push_back(PtxParam{d.bytes, d.kind});
                }
                const std::vector<std::string> dirs = words(stmt.substr(close + 1));
                for (size_t i = 0; i < dirs.size(); i++) {
                    if (dirs[i] != ".maxntid" && dirs[i] != ".reqntid") continue;
                    unsigned n = 1;
                    for (size_t j = i + 1; j < dirs.size() && j <= i + 3 && isdigit((unsigned char)dirs[j][0]); j++)
                        n *= (unsigned)strtoul(dirs[j].c_str(), nullptr, 10);
                    f.entry.maxntid = std::min(f.entry.maxntid, n);
                }
            }
            const size_t end = block_end(s, q);
            f.body = s.substr(q, end - q);
            // Demoted statics: ".shared ..." declarations at the start of a line of the body.
            for (size_t d = f.body.find(".shared"); d != std::string::npos; d = f.body.find(".shared", d + 7)) {
                size_t b = d;
                while (b > 0 && (f.body[b - 1] == ' ' || f.body[b - 1] == '\t')) b--;
                if (b > 0 && f.body[b - 1] != '\n' && f.body[b - 1] != '{' && f.body[b - 1] != ';') continue;
                const size_t semi = f.body.find(';', d);
                f.local_smem += parse_decl(f.body.substr(d, semi - d)).bytes;
            }
            if (is_entry) entry_order.push_back(f.name);
            functions[f.name] = std::move(f);
            pos = end;
            continue;
        }
        if (has_word(w, ".shared") && !is_func && !is_entry) {
            const Decl d = parse_decl(stmt);
            if (!d.name.empty()) module_shared[d.name] = d.bytes;
        }
        if (q < s.size() && s[q] == '{') {  // an initialiser: .global .b8 x[2] = {1, 2};
            q = block_end(s, q);
            while (q < s.size() && s[q] != ';') q++;
        }
        pos = q + 1;
    }
    if (out->version_major == 0 || out->target.empty()) {
        *error = "no .version or .target directive: not PTX text";
        return false;
    }
    // Static shared memory of an entry: its own demoted statics, plus the module-scope symbols
    // named in its body or in any .func it calls, each counted once.
    for (const std::string& name : entry_order) {
        std::set<std::string> seen{name}, symbols;
        std::vector<std::string> todo{name};
        size_t bytes = 0;
        while (!todo.empty()) {
            const Function& f = functions[todo.back()];
            todo.pop_back();
            bytes += f.local_smem;
            const std::string& b = f.body;
            for (size_t i = 0; i < b.size();) {
                if (!ident_char(b[i]) || (i > 0 && (ident_char(b[i - 1]) || b[i - 1] == '%' || b[i - 1] == '.'))) {
                    i++;
                    continue;
                }
                size_t e = i;
                while (e < b.size() && ident_char(b[e])) e++;
                const std::string id = b.substr(i, e - i);
                i = e;
                if (module_shared.count(id)) {
                    symbols.insert(id);
                } else if (auto it = functions.find(id); it != functions.end() && !it->second.is_entry && !seen.count(id)) {
                    seen.insert(id);
                    todo.push_back(id);
                }
            }
        }
        for (const std::string& sym : symbols) bytes += module_shared[sym];
        PtxEntry e = functions[name].entry;
        e.static_smem = bytes;
        out->entries.push_back(std::move(e));
    }
    return true;
}

}  // namespace fake
