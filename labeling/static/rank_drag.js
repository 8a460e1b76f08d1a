// Drag ordering for the Rank tab (labeling/ranking.py): chips A, B, C, ... in #rank-drag, best first. Dropping a
// chip before another (or at the end of the row) rewrites the typed order in #rank-order, which stays the source of
// truth: ties are still typed with "=", and the keys work as before. A static file served by the app (script-src
// 'self'); it reads nothing from the data but the number of answer panes.
(() => {
  if (window.__alignRankDrag) return;
  window.__alignRankDrag = true;
  const LETTERS = "ABCDE";
  let lastPrompt = null;

  function orderBox() {
    return document.querySelector("#rank-order textarea, #rank-order input");
  }

  function answerCount() {
    let k = 0;
    while (k < LETTERS.length && document.getElementById("rank-" + LETTERS[k])) k += 1;
    return k;
  }

  function writeOrder(list) {
    const box = orderBox();
    if (!box) return;
    box.value = Array.from(list.querySelectorAll(".rank-chip")).map((chip) => chip.dataset.letter).join(" ");
    box.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function build(list, k) {
    list.textContent = "";
    for (let i = 0; i < k; i += 1) {
      const chip = document.createElement("span");
      chip.className = "rank-chip";
      chip.draggable = true;
      chip.dataset.letter = LETTERS[i];
      chip.id = "rank-chip-" + LETTERS[i];
      chip.textContent = LETTERS[i];
      chip.title = "Drag to reorder (best first)";
      list.appendChild(chip);
    }
  }

  function wire(list) {
    list.addEventListener("dragstart", (event) => {
      const chip = event.target.closest(".rank-chip");
      if (!chip) return;
      event.dataTransfer.setData("text/plain", chip.dataset.letter);
      event.dataTransfer.effectAllowed = "move";
      chip.classList.add("dragging");
    });
    list.addEventListener("dragend", (event) => {
      const chip = event.target.closest(".rank-chip");
      if (chip) chip.classList.remove("dragging");
    });
    list.addEventListener("dragover", (event) => event.preventDefault());
    list.addEventListener("drop", (event) => {
      event.preventDefault();
      const letter = event.dataTransfer.getData("text/plain");
      const moved = list.querySelector('.rank-chip[data-letter="' + letter + '"]');
      if (!moved) return;
      const target = event.target.closest(".rank-chip");
      if (target && target !== moved) {
        const box = target.getBoundingClientRect();
        const after = event.clientX > box.left + box.width / 2;
        list.insertBefore(moved, after ? target.nextSibling : target);
      } else if (!target) {
        list.appendChild(moved);
      }
      writeOrder(list);  // even a chip dropped back in place: the order on screen is now the answer
    });
  }

  function refresh() {
    const holder = document.getElementById("rank-drag");
    if (!holder) return;
    let list = holder.querySelector(".rank-chips");
    if (!list) {
      list = document.createElement("div");
      list.className = "rank-chips";
      list.setAttribute("aria-label", "Answers in order, best first: drag to reorder");
      holder.appendChild(list);
      wire(list);
    }
    const k = answerCount();
    const prompt = (document.getElementById("rank-prompt") || {}).innerText || "";
    // A new item (or a changed K): the chips start again in the order shown.
    if (list.children.length !== k || prompt !== lastPrompt) {
      lastPrompt = prompt;
      build(list, k);
    }
  }

  new MutationObserver(refresh).observe(document.documentElement, { childList: true, subtree: true });
  refresh();
})();
