// Render terminal output with its colours: SGR sequences (ESC [ ... m) for the 8 + 8
// foreground colours, the 8 background colours, bold and reset become classes on spans;
// every other escape sequence is dropped. Text only ever goes into text nodes.

// CSI: ESC [ parameter bytes, intermediate bytes, one final byte. Sticky: matched at .lastIndex.
const CSI = /\x1b\[([0-?]*)([ -/]*)([@-~])/y;
// A sequence cut by the end of a chunk: kept until the next chunk completes it.
const PARTIAL = /\x1b(\[[0-?]*[ -/]*)?$/;

export class AnsiState {
  constructor() {
    this.reset();
  }

  reset() {
    this.fg = null; // "0".."7" or "b0".."b7" (bright)
    this.bg = null;
    this.bold = false;
  }

  /** Apply the parameters of one SGR sequence ("1;31", "" means reset). */
  apply(params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => (p === "" ? 0 : Number(p)));
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 0) this.reset();
      else if (code === 1) this.bold = true;
      else if (code === 22) this.bold = false;
      else if (code >= 30 && code <= 37) this.fg = String(code - 30);
      else if (code >= 90 && code <= 97) this.fg = "b" + (code - 90);
      else if (code === 39) this.fg = null;
      else if (code >= 40 && code <= 47) this.bg = String(code - 40);
      else if (code >= 100 && code <= 107) this.bg = "b" + (code - 100);
      else if (code === 49) this.bg = null;
      else if (code === 38 || code === 48) {
        // 256-colour and true-colour forms: skip their arguments, keep the current colour.
        i += codes[i + 1] === 5 ? 2 : codes[i + 1] === 2 ? 4 : 0;
      }
    }
  }

  /** The classes of text written now ("" when plain). */
  classes() {
    const out = [];
    if (this.fg !== null) out.push("ansi-fg-" + this.fg);
    if (this.bg !== null) out.push("ansi-bg-" + this.bg);
    if (this.bold) out.push("ansi-bold");
    return out.join(" ");
  }
}

/** Split text into [classes, text] segments, carrying state (and a cut-off sequence). */
export class AnsiParser {
  constructor() {
    this.state = new AnsiState();
    this.pending = "";
  }

  /** Segments of `chunk`; an escape sequence split across chunks is completed later. */
  feed(chunk) {
    let text = this.pending + chunk;
    this.pending = "";
    const cut = PARTIAL.exec(text);
    if (cut) {
      this.pending = text.slice(cut.index);
      text = text.slice(0, cut.index);
    }
    const segments = [];
    let start = 0;
    let i = text.indexOf("\x1b");
    while (i !== -1) {
      if (i > start) segments.push([this.state.classes(), text.slice(start, i)]);
      CSI.lastIndex = i;
      const m = CSI.exec(text);
      if (m) {
        if (m[3] === "m" && m[2] === "") this.state.apply(m[1]);
        start = CSI.lastIndex;
      } else {
        start = i + 1; // a lone ESC (or another kind of sequence): drop the ESC itself
      }
      i = text.indexOf("\x1b", start);
    }
    if (start < text.length) segments.push([this.state.classes(), text.slice(start)]);
    return segments;
  }
}

/**
 * Appends output to a <pre>: consecutive text with the same style shares one node, and the
 * view keeps at most `maxChars` (the oldest text goes first: the download has everything).
 */
export class AnsiConsole {
  constructor(pre, { maxChars = 2_000_000 } = {}) {
    this.pre = pre;
    this.maxChars = maxChars;
    this.parser = new AnsiParser();
    this.chars = 0;
    this.trimmed = false;
    this.lastClasses = null;
    this.lastText = null;
  }

  write(chunk) {
    for (const [classes, text] of this.parser.feed(chunk)) {
      if (classes === this.lastClasses && this.lastText) {
        this.lastText.appendData(text);
      } else {
        const node = document.createTextNode(text);
        if (classes) {
          const span = document.createElement("span");
          span.className = classes;
          span.appendChild(node);
          this.pre.appendChild(span);
        } else {
          this.pre.appendChild(node);
        }
        this.lastClasses = classes;
        this.lastText = node;
      }
      this.chars += text.length;
    }
    this.trim();
  }

  trim() {
    while (this.chars > this.maxChars && this.pre.firstChild) {
      const first = this.pre.firstChild;
      // every child is a text node or a span holding exactly one
      const node = first.nodeType === Node.TEXT_NODE ? first : first.firstChild;
      const excess = this.chars - this.maxChars;
      if (node.length > excess) {
        node.deleteData(0, excess);
        this.chars -= excess;
      } else {
        if (node === this.lastText) {
          this.lastText = null;
          this.lastClasses = null;
        }
        first.remove();
        this.chars -= node.length;
      }
      this.trimmed = true;
    }
  }

  clear() {
    this.pre.replaceChildren();
    this.parser = new AnsiParser();
    this.chars = 0;
    this.trimmed = false;
    this.lastClasses = null;
    this.lastText = null;
  }
}
